"""The release folder: signed manifests and artifacts dropped side by side, installed in-process.

A real `FolderSource` (watchdog observer included) feeds a real `ModelManager` with a real
`ModelStore` under `tmp_path`; the folder is the only artifact source.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent.observation.metrics import InferenceMetrics
from agent.releases.folder import FolderArtifacts, FolderSource
from agent.releases.lifecycle import ModelState, ModelStatus, ProbationPolicy
from agent.releases.manifest import MAX_MANIFEST_BYTES
from agent.releases.store import ModelStore
from agent.releases.swap import ModelManager
from agent.serving.inference import InferenceService
from deployment.publish.release import build_manifest
from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.releases import update_failures

KEY_ID = "folder-key"
DEBOUNCE_S = 0.05
INSTALLED = ["downloading", "verifying", "loading", "active"]
X = np.random.default_rng(5).standard_normal((2, TINY_FEATURES)).astype(np.float32)


class FolderDevice:
    """A model manager on a real store, fed by a `FolderSource` watching `folder`."""

    def __init__(self, root: Path, key: Ed25519PrivateKey, debounce_s: float) -> None:
        self.folder = root / "releases"
        self.registry = CollectorRegistry()
        metrics = InferenceMetrics(self.registry)
        self.services: dict[str, InferenceService] = {}
        self.store = ModelStore(root / "store")
        self.reports: list[ModelStatus] = []
        self.manager = ModelManager(
            store=self.store,
            trusted_keys={KEY_ID: key.public_key()},
            artifacts=FolderArtifacts(self.folder),
            services=self.services,
            service_factory=lambda name: InferenceService(name, metrics),
            registry=self.registry,
            probation=ProbationPolicy(requests=0, seconds=0, tick_s=0.05),
            listeners=[self.reports.append],
        )
        self.manager.add_rejection_listener(self.reports.append)
        self.source = FolderSource(self.folder, self.manager, debounce_s=debounce_s)
        self._run: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        # The order of the managed `serve` mode: store, folder watch, restore, then scans.
        self.store.open()
        await self.source.start()
        self._run = asyncio.get_running_loop().create_task(self.source.run())
        await self.manager.restore()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
        await self.source.stop(5.0)
        await self.manager.close()
        for service in self.services.values():
            await service.close()

    def states(self, name: str = "m") -> list[str]:
        """The state transitions of `name`, rejections included (a repeat is no transition)."""
        states = [r.state.value for r in self.reports if r.name == name]
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]

    def status(self, name: str = "m") -> ModelStatus | None:
        return self.manager.statuses.get(name)

    def failures(self, reason: str) -> float:
        return update_failures(self.registry, reason)

    async def answer(self, name: str = "m") -> np.ndarray:
        return (await self.services[name].infer({"input": X}))["output"]


StartDevice = Callable[..., Awaitable[FolderDevice]]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def start_device(tmp_path: Path, key: Ed25519PrivateKey) -> AsyncIterator[StartDevice]:
    """Starts devices on the same root (a second one is a restart); closes them all after."""
    started: list[FolderDevice] = []

    async def start(debounce_s: float = DEBOUNCE_S) -> FolderDevice:
        device = FolderDevice(tmp_path, key, debounce_s)
        started.append(device)
        await device.start()
        return device

    yield start
    for device in reversed(started):
        await device.close()


def _sign(
    key: Ed25519PrivateKey, model: bytes, version: int, *, name: str = "m", url: str | None = None
) -> dict[str, Any]:
    url = url or f"https://models.example/{name}/v{version}.onnx"
    return build_manifest(model, name=name, version=version, url=url, key=key, key_id=KEY_ID)


def _manifest_path(folder: Path, manifest: dict[str, Any]) -> Path:
    return folder / f"{manifest['name']}-v{manifest['version']}.manifest.json"


def _drop(
    folder: Path, manifest: dict[str, Any], model: bytes, artifact: str | None = None
) -> None:
    """Publish as the folder's rules ask: the artifact first, the manifest last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (artifact or f"{manifest['sha256']}.onnx")).write_bytes(model)
    _manifest_path(folder, manifest).write_text(json.dumps(manifest))


def _direct(model: bytes) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": X})[0])


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        # Polling: the state is changed by other tasks and threads that signal nothing.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def _state_is(device: FolderDevice, state: ModelState) -> Callable[[], bool]:
    return lambda: (status := device.status()) is not None and status.state == state


def _logged(logs: Sequence[Mapping[str, Any]], event: str) -> Callable[[], bool]:
    return lambda: any(entry["event"] == event for entry in logs)


@pytest.mark.parametrize("naming", ["sha256", "url"])
async def test_a_dropped_release_is_installed_from_the_artifact_beside_it(
    start_device: StartDevice, key: Ed25519PrivateKey, naming: str
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1, url="https://models.example/m/first-release.onnx?sv=1")
    artifact = f"{manifest['sha256']}.onnx" if naming == "sha256" else "first-release.onnx"
    _drop(device.folder, manifest, model, artifact)
    await _until(_state_is(device, ModelState.ACTIVE))
    assert device.states() == INSTALLED
    assert device.store.has_artifact(manifest["sha256"])
    np.testing.assert_allclose(await device.answer(), _direct(model), rtol=1e-5, atol=1e-6)


async def test_a_release_shipped_in_the_image_serves_from_first_boot(
    tmp_path: Path, start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    model = tiny_bytes(0)
    _drop(tmp_path / "releases", _sign(key, model, 1), model)
    device = await start_device()
    await _until(_state_is(device, ModelState.ACTIVE))
    assert device.states() == INSTALLED
    assert device.services["m"].ready


async def test_a_manifest_written_in_two_halves_is_read_once_whole(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    debounce_s = 0.3  # long against the pause, so a slow observer thread cannot split them
    device = await start_device(debounce_s)
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1)
    (device.folder / f"{manifest['sha256']}.onnx").write_bytes(model)
    text = json.dumps(manifest).encode()
    with capture_logs() as logs:
        with _manifest_path(device.folder, manifest).open("wb") as publisher:
            publisher.write(text[: len(text) // 2])
            publisher.flush()
            await asyncio.sleep(debounce_s / 6)
            publisher.write(text[len(text) // 2 :])
        await _until(_state_is(device, ModelState.ACTIVE))
        await asyncio.sleep(2 * debounce_s)  # room for a wrong second scan to show up
    assert device.states() == INSTALLED
    assert not _logged(logs, "folder_manifest_unreadable")()
    assert device.failures("schema_invalid") == 0


async def test_an_artifact_shorter_than_its_manifest_fails_then_installs_once_complete(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1)
    _drop(device.folder, manifest, model[: len(model) // 3])
    await _until(_state_is(device, ModelState.FAILED))
    status = device.status()
    assert status is not None
    assert status.reason == "size_mismatch"
    assert "m" not in device.services
    (device.folder / f"{manifest['sha256']}.onnx").write_bytes(model)
    await _until(_state_is(device, ModelState.ACTIVE))
    assert list(device.store.models_dir.glob("*.part")) == []
    np.testing.assert_allclose(await device.answer(), _direct(model), rtol=1e-5, atol=1e-6)


async def test_a_failed_release_is_not_retried_until_the_folder_changes(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    _drop(device.folder, _sign(key, model, 1), model[:1000])
    await _until(_state_is(device, ModelState.FAILED))
    # The agent's own reads of the folder are not changes: they must not start a retry.
    await asyncio.sleep(10 * DEBOUNCE_S)  # ten chances for a wrong retry to show up
    assert device.states() == ["downloading", "failed"]
    assert device.failures("size_mismatch") == 1


async def test_a_symlinked_artifact_is_refused_without_reading_its_target(
    tmp_path: Path, start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(model)  # the right bytes: only following the link could install them
    (device.folder / f"{manifest['sha256']}.onnx").symlink_to(outside)
    _manifest_path(device.folder, manifest).write_text(json.dumps(manifest))
    await _until(_state_is(device, ModelState.REJECTED))
    status = device.status()
    assert status is not None
    assert status.reason == "url_rejected"
    assert not device.store.has_artifact(manifest["sha256"])
    assert list(device.store.models_dir.iterdir()) == []
    assert "m" not in device.services


async def test_a_symlinked_manifest_is_not_read(
    tmp_path: Path, start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1)
    outside = tmp_path / "outside.manifest.json"
    outside.write_text(json.dumps(manifest))  # valid and signed: only the link stops it
    (device.folder / f"{manifest['sha256']}.onnx").write_bytes(model)
    with capture_logs() as logs:
        _manifest_path(device.folder, manifest).symlink_to(outside)
        await _until(_logged(logs, "folder_manifest_refused"))
        await device.manager.wait_idle()
    assert device.reports == []
    assert not device.store.has_artifact(manifest["sha256"])


async def test_a_manifest_over_64_kib_is_ignored(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1)
    # Whitespace keeps the JSON and its signature valid: only the file size is wrong.
    padded = json.dumps(manifest) + " " * MAX_MANIFEST_BYTES
    (device.folder / f"{manifest['sha256']}.onnx").write_bytes(model)
    with capture_logs() as logs:
        _manifest_path(device.folder, manifest).write_text(padded)
        await _until(_logged(logs, "folder_manifest_refused"))
        await device.manager.wait_idle()
    assert device.reports == []
    assert not device.store.has_artifact(manifest["sha256"])


async def test_an_older_manifest_left_in_the_folder_is_skipped_quietly_after_a_restart(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    first = await start_device()
    old, new = tiny_bytes(0), tiny_bytes(1)
    _drop(first.folder, _sign(key, old, 1), old)
    await _until(_state_is(first, ModelState.ACTIVE))
    v2 = _sign(key, new, 2)
    _drop(first.folder, v2, new)
    await _until(
        lambda: (s := first.status()) is not None and s.version == 2 and s.active_version == 2
    )
    await first.close()
    with capture_logs() as logs:
        second = await start_device()
        # Files are scanned in name order: once v2's is done, v1's was passed over.
        await _until(
            lambda: any(
                e["event"] == "folder_release"
                and e["file"] == _manifest_path(second.folder, v2).name
                for e in logs
            )
        )
    assert second.states() == ["active"]  # restored; no `rejected` for the old file
    assert second.failures("version_not_monotonic") == 0
    np.testing.assert_allclose(await second.answer(), _direct(new), rtol=1e-5, atol=1e-6)


async def test_a_manifest_with_a_bad_signature_is_rejected(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    model = tiny_bytes(0)
    manifest = _sign(key, model, 1)
    manifest["version"] = 7  # no longer what was signed
    _drop(device.folder, manifest, model)
    await _until(lambda: "m" in device.manager.rejections)
    status = device.manager.rejections["m"]
    assert (status.state, status.reason) == (ModelState.REJECTED, "signature_invalid")
    assert device.status() is None, "a rejection is not the state of a model"
    assert device.states() == ["rejected"]
    assert not device.store.has_artifact(manifest["sha256"])


async def test_a_deeply_nested_manifest_is_ignored_and_the_folder_still_watched(
    start_device: StartDevice, key: Ed25519PrivateKey
) -> None:
    device = await start_device()
    (device.folder / "hostile.manifest.json").write_text("[" * 5000)  # under 64 KiB
    model = tiny_bytes(0)
    _drop(device.folder, _sign(key, model, 1), model)
    await _until(_state_is(device, ModelState.ACTIVE))
    assert device.states() == INSTALLED

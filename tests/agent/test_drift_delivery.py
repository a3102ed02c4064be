"""The drift baseline travels with the release: fetched, verified and stored like the model;
a bad one fails the release; none means `no_baseline`, and the model serves."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.baseline import BaselinePack
from agent.observation.watch import Observer
from agent.releases.lifecycle import ModelState
from deployment.drift.baseline_pack import build_baseline
from deployment.examples.onnx_models import mlp
from tests.support.artifact_server import Artifact, TestPki
from tests.support.drift_packs import FAST
from tests.support.releases import Device, Publisher, make_device
from tests.support.twin import twin

MODEL = mlp([4, 8, 3], seed=5).SerializeToString()


def _pack_bytes() -> bytes:
    rng = np.random.default_rng(0)
    pack = build_baseline({"input": rng.standard_normal((600, 4))}, {}, FAST)
    return json.dumps(pack).encode()


PACK = _pack_bytes()


class Recorder:
    def __init__(self) -> None:
        self.attached: list[tuple[str, int, BaselinePack | None, str | None]] = []

    def attach(
        self, name: str, version: int, pack: BaselinePack | None, baseline_sha256: str | None
    ) -> None:
        self.attached.append((name, version, pack, baseline_sha256))

    def detach(self, name: str) -> None:
        """Removals are not what these tests are about (tests/agent/test_remove.py)."""


@pytest.fixture
async def watched(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> AsyncIterator[tuple[Device, Recorder]]:
    recorder = Recorder()
    device = make_device(tmp_path / "store", publisher, artifact_pki, observer=recorder)
    yield device, recorder
    await device.manager.close()


def _release(publisher: Publisher, version: int, served: bytes, pack: bytes = PACK) -> Any:
    url = publisher.server.add(f"baselines/{version}.json", Artifact(served))
    return publisher.release(MODEL, version, baseline=(pack, url))


async def _install(device: Device, manifest: dict[str, Any]) -> ModelState:
    device.manager.submit(manifest)
    await device.manager.wait_idle()
    return device.manager.statuses["m"].state


async def test_the_baseline_is_fetched_stored_and_handed_to_the_observer(
    watched: tuple[Device, Recorder], publisher: Publisher
) -> None:
    device, recorder = watched
    assert await _install(device, _release(publisher, 1, PACK)) is ModelState.ACTIVE
    sha = hashlib.sha256(PACK).hexdigest()
    ((name, version, pack, attached_sha),) = recorder.attached
    assert (name, version, attached_sha) == ("m", 1, sha)
    assert pack is not None
    assert [f.name for f in pack.features] == ["input[0]", "input[1]", "input[2]", "input[3]"]
    assert device.store.baseline_path(sha).read_bytes() == PACK
    active = device.store.state.record("m").active
    assert active is not None
    assert active.baseline_sha256 == sha


OTHER = PACK + b"\n"  # another valid pack: version 1's cached one is not reused


@pytest.mark.parametrize(
    ("served", "pack", "reason"),
    [
        (OTHER[:-1] + b" ", OTHER, "hash_mismatch"),  # a flipped byte
        (OTHER[:100], OTHER, "size_mismatch"),
        (b'{"schema": "nope"}', b'{"schema": "nope"}', "baseline_invalid"),  # signed, unusable
    ],
    ids=["flipped", "truncated", "unusable"],
)
async def test_a_bad_baseline_fails_the_release_and_the_old_model_serves(
    watched: tuple[Device, Recorder], publisher: Publisher, served: bytes, pack: bytes, reason: str
) -> None:
    device, recorder = watched
    assert await _install(device, _release(publisher, 1, PACK)) is ModelState.ACTIVE
    assert await _install(device, _release(publisher, 2, served, pack)) is ModelState.FAILED
    assert device.manager.statuses["m"].reason == reason
    assert device.failures(reason) == 1
    assert [v for _, v, _, _ in recorder.attached] == [1]
    model = device.services["m"].model
    assert model is not None
    assert model.version == 1


async def test_a_release_without_baseline_serves_and_reports_no_baseline(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    observer = Observer(CollectorRegistry())
    device = make_device(tmp_path / "store", publisher, artifact_pki, observer=observer)
    try:
        assert await _install(device, publisher.release(MODEL, 1)) is ModelState.ACTIVE
        drift = twin(observer.drift_entry("m"))
        assert drift is not None
        assert drift["state"] == "no_baseline"
    finally:
        await device.manager.close()


async def test_a_restart_watches_the_restored_release_with_its_stored_baseline(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    first = make_device(tmp_path / "store", publisher, artifact_pki)
    assert await _install(first, _release(publisher, 1, PACK)) is ModelState.ACTIVE
    await first.manager.close()
    recorder = Recorder()
    again = make_device(tmp_path / "store", publisher, artifact_pki, observer=recorder)
    try:
        await again.manager.restore()
        ((_, version, pack, sha),) = recorder.attached
        assert (version, sha) == (1, hashlib.sha256(PACK).hexdigest())
        assert pack is not None
    finally:
        await again.manager.close()

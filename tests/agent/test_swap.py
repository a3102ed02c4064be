"""Verified delivery and hot swap end to end: real HTTPS server, real models, real store."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.releases.lifecycle import ModelState, ProbationPolicy, SwapError
from agent.releases.loader import LOADER_NICENESS
from agent.releases.manifest import sign_manifest
from agent.releases.state import StoreState
from agent.releases.store import ModelStore
from deployment.examples.onnx_models import mlp
from tests.support.artifact_server import Artifact, FullDisk, TestPki
from tests.support.models import TINY_FEATURES, mid_bytes, tiny_bytes
from tests.support.releases import Device, Publisher, make_device
from wire.reasons import Reason

X = np.random.default_rng(3).standard_normal((1, TINY_FEATURES)).astype(np.float32)


@pytest.fixture
async def device(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> AsyncIterator[Device]:
    dev = make_device(tmp_path / "store", publisher, artifact_pki)
    yield dev
    await dev.manager.close()


async def _install(device: Device, manifest: dict[str, Any]) -> ModelState:
    device.manager.submit(manifest)
    await device.manager.wait_idle()
    return device.manager.statuses[manifest["name"]].state


async def _answer(device: Device, name: str = "m") -> np.ndarray:
    return (await device.services[name].infer({"input": X}))["output"]


def _resign(publisher: Publisher, manifest: dict[str, Any]) -> dict[str, Any]:
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    return sign_manifest(unsigned, publisher.key, "test-key")


async def test_a_signed_release_is_fetched_verified_loaded_and_served(
    device: Device, publisher: Publisher
) -> None:
    assert await _install(device, publisher.release(tiny_bytes(0), 1)) == ModelState.ACTIVE
    assert device.states() == ["downloading", "verifying", "loading", "active"]
    assert (await _answer(device)).shape == (1, 8)
    assert device.store.state.record("m").active is not None
    assert device.services["m"].metadata().parameters["status_state"] == "active"


async def test_a_hot_swap_under_load_drops_no_request(device: Device, publisher: Publisher) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    old = await _answer(device)
    service = device.services["m"]
    stop = asyncio.Event()
    answers: list[np.ndarray] = []

    async def load() -> None:
        while not stop.is_set():
            answers.append((await service.infer({"input": X}))["output"])
            await asyncio.sleep(0)

    clients = [asyncio.ensure_future(load()) for _ in range(8)]
    assert await _install(device, publisher.release(tiny_bytes(1), 2)) == ModelState.ACTIVE
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*clients)  # any failed request would raise here
    new = await _answer(device)
    assert not np.allclose(old, new)
    assert any(np.allclose(a, old) for a in answers)
    assert any(np.allclose(a, new) for a in answers)
    assert device.store.state.record("m").last_known_good is not None


@pytest.mark.parametrize("tamper", ["unsigned", "bad_signature", "unknown_key"])
async def test_untrusted_manifests_are_rejected_before_any_download(
    device: Device, publisher: Publisher, tamper: str
) -> None:
    manifest = publisher.release(tiny_bytes(0), 1)
    if tamper == "unsigned":
        del manifest["signature"]
    elif tamper == "bad_signature":
        manifest["version"] = 2  # the signature no longer covers what is said
    else:
        manifest["signature"]["key_id"] = "someone-else"
    status = device.manager.submit(manifest)
    assert status.state == ModelState.REJECTED
    assert publisher.server.requests == []
    assert "m" not in device.services


async def test_an_older_version_is_rejected_and_changes_nothing(
    device: Device, publisher: Publisher
) -> None:
    await _install(device, publisher.release(tiny_bytes(1), 5))
    status = device.manager.submit(publisher.release(tiny_bytes(0), 4))
    assert status.reason == "version_not_monotonic"
    assert device.services["m"].model is not None
    assert device.services["m"].model.version == 5
    assert device.failures("version_not_monotonic") == 1


async def test_the_same_release_again_is_not_reloaded(device: Device, publisher: Publisher) -> None:
    manifest = publisher.release(tiny_bytes(0), 1)
    await _install(device, manifest)
    model = device.services["m"].model
    requests = len(publisher.server.requests)
    device.manager.submit(copy.deepcopy(manifest))
    await device.manager.wait_idle()
    assert device.services["m"].model is model
    assert len(publisher.server.requests) == requests


@pytest.mark.parametrize(
    ("artifact", "reason"),
    [
        (Artifact(tiny_bytes(1), flip_at=100), "hash_mismatch"),
        (Artifact(tiny_bytes(1), truncate_to=1000), "size_mismatch"),
        (Artifact(tiny_bytes(1), status=404), "fetch_failed"),
    ],
)
async def test_a_bad_download_fails_and_the_old_model_keeps_serving(
    device: Device, publisher: Publisher, artifact: Artifact, reason: str
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    old = await _answer(device)
    state = await _install(device, publisher.release(tiny_bytes(1), 2, artifact=artifact))
    assert state == ModelState.FAILED
    assert device.manager.statuses["m"].reason == reason
    np.testing.assert_array_equal(await _answer(device), old)
    assert device.failures(reason) == 1
    assert list(device.store.models_dir.glob("*.part")) == []


async def test_a_signed_file_that_is_not_onnx_fails_to_load(
    device: Device, publisher: Publisher
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    manifest = publisher.release(tiny_bytes(0), 2)
    junk = b"this is not a model" * 10
    manifest.update(
        sha256=hashlib.sha256(junk).hexdigest(),
        size=len(junk),
        url=publisher.server.add("junk.onnx", Artifact(junk)),
    )
    assert await _install(device, _resign(publisher, manifest)) == ModelState.FAILED
    assert device.manager.statuses["m"].reason == "not_onnx"
    assert (await _answer(device)).shape == (1, 8)


async def test_a_model_unlike_its_manifest_contract_is_refused(
    device: Device, publisher: Publisher
) -> None:
    manifest = publisher.release(tiny_bytes(0), 1)
    manifest["contract"]["outputs"][0]["shape"] = [-1, 9]
    assert await _install(device, _resign(publisher, manifest)) == ModelState.FAILED
    assert device.manager.statuses["m"].reason == "contract_mismatch"
    assert "shape" in device.manager.statuses["m"].message


async def test_a_changed_contract_needs_the_manifest_flag(
    device: Device, publisher: Publisher
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    wider = bytes(mlp([32, 64, 9]).SerializeToString())
    assert await _install(device, publisher.release(wider, 2)) == ModelState.FAILED
    assert device.manager.statuses["m"].reason == "contract_mismatch"
    flagged = publisher.release(wider, 3, contract_change=True)
    assert await _install(device, flagged) == ModelState.ACTIVE
    assert (await _answer(device)).shape == (1, 9)


async def test_a_golden_sample_outside_tolerance_fails_at_warm_up(
    device: Device, publisher: Publisher
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    manifest = publisher.release(tiny_bytes(1), 2)
    manifest["golden"]["outputs"][0]["data"][0] += 1.0
    assert await _install(device, _resign(publisher, manifest)) == ModelState.FAILED
    assert device.manager.statuses["m"].reason == "golden_mismatch"
    assert device.services["m"].model is not None
    assert device.services["m"].model.version == 1


async def test_a_disk_full_during_download_leaves_the_old_state(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    disk = FullDisk(budget=10**9)
    device = make_device(
        tmp_path / "store",
        publisher,
        artifact_pki,
        store_factory=lambda root: ModelStore(root, opener=disk),
    )
    await _install(device, publisher.release(tiny_bytes(0), 1))
    before = (device.store.root / "state.json").read_bytes()
    disk.budget = disk.written + 1000
    assert await _install(device, publisher.release(mid_bytes(0), 2, contract_change=True)) == (
        ModelState.FAILED
    )
    assert device.manager.statuses["m"].reason == "disk_full"
    assert list(device.store.models_dir.glob("*.part")) == []
    # state.json only gained the version seen; the active model is unchanged
    active = device.store.state.record("m").active
    assert active is not None
    assert active.version == 1
    assert before != b""
    await device.manager.close()


async def test_rollback_serves_the_last_known_good_again(
    device: Device, publisher: Publisher
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    first = await _answer(device)
    await _install(device, publisher.release(tiny_bytes(1), 2))
    with capture_logs() as logs:
        status = await device.manager.rollback("m")
    # One status, one release: v2 is the one rolled back; v1 is the one serving.
    assert (status.state, status.version, status.active_version) == (ModelState.ROLLED_BACK, 2, 1)
    assert status.sha256 == device.store.state.record("m").rolled_back.sha256  # type: ignore[union-attr]
    [line] = [e for e in logs if e["event"] == "model_status"]
    assert (line["state"], line["version"], line["active_version"]) == ("rolled_back", 2, 1)
    # The release now serving is known good; there is nothing older to roll back to.
    record = StoreState.from_json_bytes(device.store.state_path.read_bytes()).record("m")
    assert record.active == record.last_known_good
    assert record.active is not None
    assert record.active.version == 1
    np.testing.assert_array_equal(await _answer(device), first)
    with pytest.raises(SwapError) as caught:
        await device.manager.rollback("m")
    assert caught.value.reason == "no_last_known_good"


async def test_a_release_slower_than_its_predecessor_is_rolled_back_on_probation(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    device = make_device(
        tmp_path / "store",
        publisher,
        artifact_pki,
        probation=ProbationPolicy(requests=25, seconds=60, min_requests=20, max_latency_ratio=2.0),
    )
    await _install(device, publisher.release(tiny_bytes(0), 1))
    for _ in range(30):
        await _answer(device)
    slow = bytes(mlp([32, 2048, 2048, 8]).SerializeToString())
    await _install(device, publisher.release(slow, 2))
    for _ in range(30):
        await _answer(device)
    for _ in range(100):
        if device.manager.statuses["m"].state == ModelState.ROLLED_BACK:
            break
        await asyncio.sleep(0.05)
    status = device.manager.statuses["m"]
    assert (status.state, status.reason) == (ModelState.ROLLED_BACK, "probation_latency")
    assert device.services["m"].model is not None
    assert device.services["m"].model.version == 1
    await device.manager.close()


async def test_a_restart_restores_the_active_model_from_the_store(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    first = make_device(tmp_path / "store", publisher, artifact_pki)
    await _install(first, publisher.release(tiny_bytes(1), 3))
    answer = await _answer(first)
    await first.manager.close()
    second = make_device(tmp_path / "store", publisher, artifact_pki)
    await second.manager.restore()
    assert second.manager.statuses["m"].state == ModelState.ACTIVE
    assert second.manager.statuses["m"].reason == "restored"
    np.testing.assert_array_equal(await _answer(second), answer)
    await second.manager.close()


async def test_a_burst_of_releases_ends_on_the_newest(device: Device, publisher: Publisher) -> None:
    manifests = [publisher.release(tiny_bytes(v % 2), v) for v in range(1, 41)]
    for manifest in manifests:
        device.manager.submit(manifest)
        await asyncio.sleep(0)
    await device.manager.wait_idle()
    assert device.manager.statuses["m"].state == ModelState.ACTIVE
    assert device.services["m"].model is not None
    assert device.services["m"].model.version == 40
    highest = device.store.state.record("m").highest_seen
    assert highest is not None
    assert highest.version == 40


async def test_a_signature_over_other_bytes_is_refused(
    device: Device, publisher: Publisher
) -> None:
    manifest = publisher.release(tiny_bytes(0), 1)
    manifest["signature"]["value"] = base64.b64encode(bytes(64)).decode()
    assert device.manager.submit(manifest).reason == "signature_invalid"


async def test_models_load_on_a_thread_of_lower_cpu_priority(
    device: Device, publisher: Publisher
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    loaders = [t for t in threading.enumerate() if t.name.startswith("model-loader")]
    assert loaders
    expected = os.getpriority(os.PRIO_PROCESS, 0) + LOADER_NICENESS
    for loader in loaders:  # other tests' loaders may not have exited yet
        assert loader.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, loader.native_id) == expected


# -- what a refused manifest may not touch; what a rollback keeps refusing -------------------


@pytest.mark.parametrize("claimed", ["m", "other"])
async def test_a_forged_manifest_touches_nothing_that_serves(
    device: Device, publisher: Publisher, claimed: str
) -> None:
    await _install(device, publisher.release(tiny_bytes(0), 1))
    before = device.manager.statuses["m"]
    metadata = device.services["m"].metadata()
    forged = publisher.release(tiny_bytes(1), 2, name=claimed)
    forged["signature"]["value"] = base64.b64encode(bytes(64)).decode()
    answer = device.manager.submit(forged)
    assert (answer.state, answer.reason) == (ModelState.REJECTED, "signature_invalid")
    assert device.manager.rejections[claimed] == answer
    assert device.manager.statuses == {"m": before}
    assert device.services["m"].metadata() == metadata
    assert list(device.services) == ["m"]


async def test_300_forged_names_leave_the_release_metrics_bounded(
    device: Device, publisher: Publisher
) -> None:
    """A refused manifest's name is its author's choice: it never becomes a label."""
    await _install(device, publisher.release(tiny_bytes(0), 1))
    forged = publisher.release(tiny_bytes(1), 2, name="m")

    def series() -> int:
        return sum(len(family.samples) for family in device.registry.collect())

    before = series()
    for i in range(300):
        claim = {**forged, "name": f"forged-{i}"}
        assert device.manager.submit(claim).reason == "signature_invalid"
    # One `other` series per counter for the refusals (failures, outcomes), nothing per name.
    assert series() - before <= 4
    assert (
        device.registry.get_sample_value(
            "agent_model_update_failures_total", {"model": "other", "reason": "signature_invalid"}
        )
        == 300
    )


async def test_the_serving_release_resubmitted_after_it_expired_is_active(
    device: Device, publisher: Publisher
) -> None:
    created = datetime.now(UTC) - timedelta(hours=2)
    manifest = publisher.release(tiny_bytes(0), 1, created=created, valid_for=timedelta(hours=3))
    await _install(device, manifest)
    expired = publisher.release(tiny_bytes(0), 1, created=created, valid_for=timedelta(hours=1))
    assert device.manager.submit(expired).state == ModelState.ACTIVE
    assert device.manager.rejections == {}
    # ...but an expired release that does not serve is refused.
    other = publisher.release(tiny_bytes(1), 2, created=created, valid_for=timedelta(hours=1))
    assert device.manager.submit(other).reason == "expired"


async def test_a_rolled_back_release_stays_rolled_back_after_a_restart(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    first = make_device(tmp_path / "store", publisher, artifact_pki)
    await _install(first, publisher.release(tiny_bytes(0), 1))
    bad = publisher.release(tiny_bytes(1), 2)
    await _install(first, bad)
    await first.manager.rollback("m", Reason.PROBATION_ERRORS)
    await first.manager.close()

    second = make_device(tmp_path / "store", publisher, artifact_pki)  # same volume
    await second.manager.restore()
    answer = second.manager.submit(bad)  # what a twin resync does after the restart
    assert (answer.state, answer.reason) == (ModelState.ROLLED_BACK, "probation_errors")
    assert (answer.version, answer.active_version) == (2, 1)  # the release refused; the serving
    assert "version 2 was rolled back" in answer.message
    assert second.manager.submit(bad) is answer  # a second resync: the same answer
    await second.manager.wait_idle()
    assert second.services["m"].model is not None
    assert second.services["m"].model.version == 1
    assert "downloading" not in second.states()

    fixed = publisher.release(tiny_bytes(0), 3)
    assert await _install(second, fixed) == ModelState.ACTIVE
    assert second.store.state.record("m").rolled_back is None
    await second.manager.close()


async def test_probation_is_reported_until_it_passes(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    device = make_device(
        tmp_path / "store",
        publisher,
        artifact_pki,
        probation=ProbationPolicy(requests=5, seconds=60, min_requests=1),
    )
    await _install(device, publisher.release(tiny_bytes(0), 1))
    watching = device.manager.probation["m"]
    assert (watching.state, watching.requests) == ("watching", 0)
    for _ in range(5):
        await _answer(device)
    for _ in range(100):
        if device.manager.probation["m"].state != "watching":
            break
        await asyncio.sleep(0.05)
    passed = device.manager.probation["m"]
    assert (passed.state, passed.requests, passed.error_rate) == ("passed", 5, 0.0)
    assert passed.p99_ratio is None  # a first install has nothing to compare with
    assert device.manager.statuses["m"].message.startswith("probation passed")
    await device.manager.close()


async def test_a_probation_without_traffic_ends_passed_without_traffic_not_passed(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    device = make_device(
        tmp_path / "store",
        publisher,
        artifact_pki,
        probation=ProbationPolicy(requests=5, seconds=0.3, min_requests=3),
    )
    await _install(device, publisher.release(tiny_bytes(0), 1))
    await _answer(device)  # one request: fewer than the minimum of 3
    with capture_logs() as logs:
        for _ in range(100):
            if device.manager.probation["m"].state != "watching":
                break
            await asyncio.sleep(0.05)
    ended = device.manager.probation["m"]
    assert (ended.state, ended.requests) == ("passed_without_traffic", 1)
    status = device.manager.statuses["m"]
    assert (status.state, status.version) == (ModelState.ACTIVE, 1)  # it keeps serving
    assert "passed without traffic" in status.message
    assert [e["event"] for e in logs if e["event"].startswith("probation_")] == [
        "probation_passed_without_traffic"
    ]
    assert device.store.state.record("m").installing is None  # off trial all the same
    await device.manager.close()

"""A model no longer desired stops serving: requests in flight finish, nothing is restored after
a restart, and the same release desired again is installed again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.observation.watch import Observer
from agent.releases.lifecycle import ModelState
from agent.serving.contract import RequestError
from tests.support.artifact_server import Artifact, TestPki
from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.releases import Device, Publisher, make_device
from wire.reasons import Reason

X = np.random.default_rng(4).standard_normal((1, TINY_FEATURES)).astype(np.float32)


@pytest.fixture
def observer() -> Observer:
    return Observer(CollectorRegistry())


@pytest.fixture
async def device(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki, observer: Observer
) -> AsyncIterator[Device]:
    dev = make_device(tmp_path / "store", publisher, artifact_pki, observer=observer)
    yield dev
    await dev.manager.close()


async def _serve(device: Device, publisher: Publisher, name: str, seed: int) -> str:
    manifest = publisher.release(tiny_bytes(seed), 1, name=name)
    device.manager.submit(manifest)
    await device.manager.wait_idle()
    assert device.manager.statuses[name].state is ModelState.ACTIVE
    return str(manifest["sha256"])


async def test_a_removed_model_finishes_its_requests_then_serves_no_more(
    device: Device, publisher: Publisher, observer: Observer
) -> None:
    await _serve(device, publisher, "kept", 0)
    sha = await _serve(device, publisher, "gone", 1)
    service = device.services["gone"]
    answered: list[int] = []
    refused: list[Reason] = []

    async def client() -> None:
        while True:
            try:
                await service.infer({"input": X})
            except RequestError as error:
                refused.append(error.reason)
                return
            answered.append(1)
            await asyncio.sleep(0)

    clients = [asyncio.ensure_future(client()) for _ in range(4)]
    await asyncio.sleep(0.2)
    assert await device.manager.remove("gone")
    await asyncio.wait_for(asyncio.gather(*clients), 10)

    assert answered
    assert set(refused) == {Reason.NOT_READY}  # after the removal, never an error mid-call
    assert "gone" not in device.services
    assert set(observer.watches) == {"kept"}
    assert "gone" not in device.manager.statuses
    assert device.store.state.record("gone").active is None
    assert sha not in device.store.state.protected_artifacts()
    info = {"model": "gone", "version": "1", "sha256": sha}
    assert device.registry.get_sample_value("agent_model_info", info) is None
    count = "agent_model_request_duration_seconds_count"
    assert device.registry.get_sample_value(count, {"model": "gone"}) is None
    assert device.registry.get_sample_value(count, {"model": "kept"}) is not None
    assert (await device.services["kept"].infer({"input": X}))["output"].shape == (1, 8)


async def test_a_removed_model_is_not_restored_and_is_installed_again_when_desired(
    tmp_path: Path, publisher: Publisher, artifact_pki: TestPki
) -> None:
    first = make_device(tmp_path / "store", publisher, artifact_pki)
    manifest = publisher.release(tiny_bytes(2), 3, name="m")
    first.manager.submit(manifest)
    await first.manager.wait_idle()
    assert await first.manager.remove("m")
    await first.manager.close()

    second = make_device(tmp_path / "store", publisher, artifact_pki)
    await second.manager.restore()
    assert "m" not in second.services
    assert "m" not in second.manager.statuses
    second.manager.submit(manifest)  # the same release, desired again
    await second.manager.wait_idle()
    assert second.manager.statuses["m"].state is ModelState.ACTIVE
    assert (await second.services["m"].infer({"input": X}))["output"].shape == (1, 8)
    await second.manager.close()


async def test_removing_a_model_being_installed_ends_the_install(
    device: Device, publisher: Publisher
) -> None:
    model = tiny_bytes(3)
    stalled = publisher.release(model, 1, name="m", artifact=Artifact(model, stall_interval_s=0.1))
    device.manager.submit(stalled)
    await asyncio.sleep(0.3)
    assert device.manager.statuses["m"].state is ModelState.DOWNLOADING
    assert await device.manager.remove("m")
    await device.manager.wait_idle()
    assert "m" not in device.manager.statuses
    assert "m" not in device.services
    assert device.store.state.record("m").installing is None


async def test_removing_a_model_never_served_changes_nothing(device: Device) -> None:
    assert not await device.manager.remove("never")
    assert device.store.state.models == {}

"""Fault injection: what tests of the agent's resilience stand on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from azure.iot.device.exceptions import ClientError, ServiceError

from simulator import HubEvent, Simulator
from simulator import ServiceError as HubServiceError
from tests.simulator.conftest import DEVICE, PAHO_RECONNECT_LEAK, ClientFactory
from tests.support.inbox import sdk_message


def _connected(module: str) -> Callable[[HubEvent], bool]:
    def matches(event: HubEvent) -> bool:
        return event.kind == "connected" and event.module_id == module

    return matches


@pytest.mark.filterwarnings(PAHO_RECONNECT_LEAK)
async def test_refused_reconnects_hold_the_module_off_for_the_given_time(
    sim: Simulator, module_client: ClientFactory
) -> None:
    await module_client("producer", connection_retry_interval=1)
    dropped_at = time.monotonic()  # before the refusal starts, so the bound below is strict
    sim.faults.refuse_connections(DEVICE, "producer", seconds=2.5)
    assert sim.faults.drop_connection(DEVICE, "producer")
    await asyncio.to_thread(sim.events.wait_for_count, _connected("producer"), 2, 20)
    assert time.monotonic() - dropped_at >= 2.5
    assert sim.is_connected(DEVICE, "producer")


def test_dropping_a_module_that_is_not_connected_reports_false(sim: Simulator) -> None:
    assert sim.faults.drop_connection(DEVICE, "producer") is False


async def test_twin_responses_can_fail_with_a_status(
    sim: Simulator, module_client: ClientFactory
) -> None:
    client = await module_client("producer")
    sim.faults.twin_responses(status=503, count=1)
    with pytest.raises(ClientError) as failed:
        await client.get_twin()
    # the SDK wraps the hub's status in a generic ClientError
    assert isinstance(failed.value.__cause__, ServiceError)
    assert "503" in str(failed.value.__cause__)
    assert (await client.get_twin())["desired"]["$version"] == 1


async def test_twin_responses_can_be_delayed(sim: Simulator, module_client: ClientFactory) -> None:
    client = await module_client("producer")
    sim.faults.twin_responses(delay=1.5)
    started = time.monotonic()
    await client.patch_twin_reported_properties({"slow": True})
    assert time.monotonic() - started >= 1.5
    sim.faults.clear()
    started = time.monotonic()
    await client.get_twin()
    assert time.monotonic() - started < 1.5


async def test_paused_pubacks_hold_sends_until_resumed(
    sim: Simulator, module_client: ClientFactory
) -> None:
    client = await module_client("consumer")
    sim.faults.pause_pubacks()
    send = asyncio.ensure_future(client.send_message_to_output(sdk_message("held"), "out"))
    await asyncio.sleep(0.5)
    assert not send.done()
    sim.faults.resume_pubacks()
    await asyncio.wait_for(send, 5)
    assert sim.upstream.wait_for(lambda item: item.body == b"held", 5).output == "out"


async def test_an_offline_module_gets_no_method_and_the_caller_gets_404(sim: Simulator) -> None:
    with pytest.raises(HubServiceError) as refused:
        await asyncio.to_thread(sim.invoke_method, DEVICE, "producer", "status", {}, 2)
    assert refused.value.status == 404

"""The real azure-iot-device SDK against the simulator: what a module sees of edgeHub."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.iot.device import Message, MethodRequest, MethodResponse
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.device.exceptions import ClientError, CredentialError

from simulator import Simulator, UpstreamMessage
from tests.simulator.conftest import DEVICE, PAHO_RECONNECT_LEAK, ClientFactory
from tests.support.inbox import Inbox, sdk_message


async def test_edge_environment_client_reads_the_manifest_desired_twin(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in sim.edge_env(DEVICE, "producer").items():
        monkeypatch.setenv(name, value)
    client = IoTHubModuleClient.create_from_edge_environment()
    try:
        await client.connect()
        twin = await client.get_twin()
    finally:
        await client.shutdown()
    assert twin["desired"] == {"rate": 5, "model": {"name": "m", "version": 1}, "$version": 1}
    assert twin["reported"] == {"$version": 1}


async def test_reported_patches_merge_and_increment_the_version(
    sim: Simulator, module_client: ClientFactory
) -> None:
    client = await module_client("producer")
    await client.patch_twin_reported_properties({"model": {"state": "loading", "version": 1}})
    await client.patch_twin_reported_properties({"model": {"state": "active"}, "agent": None})
    twin = await client.get_twin()
    assert twin["reported"] == {"model": {"state": "active", "version": 1}, "$version": 3}
    assert sim.twin(DEVICE, "producer")["properties"]["reported"]["$version"] == 3


async def test_a_twin_query_shows_when_a_module_last_reported(
    sim: Simulator, module_client: ClientFactory
) -> None:
    query = f"SELECT * FROM devices.modules WHERE moduleId = 'producer' AND deviceId = '{DEVICE}'"
    (before,) = sim.query(query)
    assert before["lastActivityTime"] == "0001-01-01T00:00:00Z"  # IoT Hub's never
    client = await module_client("producer")
    await client.patch_twin_reported_properties({"model": {"state": "loading"}})
    (after,) = sim.query(query)
    seen = datetime.strptime(str(after["lastActivityTime"])[:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(seen.replace(tzinfo=UTC).timestamp() - time.time()) < 60
    assert after["connectionState"] == "Connected"


async def test_desired_update_reaches_the_module_with_its_version(
    sim: Simulator, module_client: ClientFactory
) -> None:
    client = await module_client("producer")
    patches: Inbox[dict[str, Any]] = Inbox()
    client.on_twin_desired_properties_patch_received = patches.put
    sim.update_desired(DEVICE, "producer", {"rate": 7, "model": None})
    assert await patches.get() == {"rate": 7, "model": None, "$version": 2}
    assert (await client.get_twin())["desired"] == {"rate": 7, "$version": 2}


async def test_routed_message_keeps_system_and_custom_properties(
    module_client: ClientFactory,
) -> None:
    producer = await module_client("producer")
    consumer = await module_client("consumer")
    received: Inbox[Message] = Inbox()
    consumer.on_message_received = received.put
    message = sdk_message(
        '{"x": 1}',
        message_id="mid-1",
        content_encoding="utf-8",
        content_type="application/json",
    )
    message.correlation_id = "cid-1"
    message.custom_properties.update({"schema": "sample/v1", "odd key": "a&b=c/d %"})
    await producer.send_message_to_output(message, "samples")
    got = await received.get()
    assert got.input_name == "samples"
    assert got.data == b'{"x": 1}'
    assert (got.message_id, got.correlation_id) == ("mid-1", "cid-1")
    assert (got.content_type, got.content_encoding) == ("application/json", "utf-8")
    assert got.custom_properties == {
        "schema": "sample/v1",
        "odd key": "a&b=c/d %",
        # edgeHub names the sending identity in every routed message
        "$.cdid": DEVICE,
        "$.cmid": "producer",
    }


async def test_output_goes_upstream_only_when_the_route_condition_holds(
    sim: Simulator, module_client: ClientFactory
) -> None:
    producer = await module_client("producer")
    for severity, level in (("low", "1"), ("high", "1"), ("low", "9")):
        message = sdk_message(f"{severity}-{level}")
        message.custom_properties.update({"severity": severity, "level": level})
        await producer.send_message_to_output(message, "alerts")
    arrived = sim.upstream.wait_for_count(lambda _: True, 2, timeout=10)
    assert [item.body for item in arrived] == [b"high-1", b"low-9"]
    assert all(item.output == "alerts" and item.module_id == "producer" for item in arrived)
    await asyncio.sleep(0.2)
    assert len(sim.upstream) == 2


async def test_any_output_of_a_module_can_be_routed_upstream(
    sim: Simulator, module_client: ClientFactory
) -> None:
    consumer = await module_client("consumer")
    await consumer.send_message_to_output(sdk_message("p", message_id="p1"), "predictions")

    def is_prediction(item: UpstreamMessage) -> bool:
        return item.output == "predictions"

    found = await sim.upstream.next_matching(is_prediction, timeout=10)
    assert found.message.system["messageId"] == "p1"
    assert found.message.system["connectionModuleId"] == "consumer"


async def test_method_round_trip(sim: Simulator, module_client: ClientFactory) -> None:
    client = await module_client("producer")

    async def answer(request: MethodRequest) -> None:
        payload = {"method": request.name, "echo": request.payload}
        await client.send_method_response(
            MethodResponse.create_from_method_request(request, 201, payload)
        )

    client.on_method_request_received = answer
    status, payload = await asyncio.to_thread(
        sim.invoke_method, DEVICE, "producer", "status", {"verbose": True}, 10
    )
    assert (status, payload) == (201, {"method": "status", "echo": {"verbose": True}})


async def test_wrong_key_is_refused(sim: Simulator) -> None:
    good = sim.module_connection_string(DEVICE, "producer")
    bad = good.rsplit("SharedAccessKey=", 1)[0] + "SharedAccessKey=" + "A" * 43 + "="
    client = IoTHubModuleClient.create_from_connection_string(
        bad, server_verification_cert=sim.ca_cert_path.read_text(), connection_retry=False
    )
    try:
        with pytest.raises(CredentialError):
            await client.connect()
    finally:
        await client.shutdown()


async def test_expired_token_is_refused(sim: Simulator) -> None:
    token = sim.module_sas_token(DEVICE, "producer", expiry=int(time.time()) + 1)
    # passed as a dict: the SDK annotates **kwargs as dict[str, Any] rather than Any
    options: dict[str, Any] = {
        "gateway_hostname": sim.host,
        "server_verification_cert": sim.ca_cert_path.read_text(),
        "connection_retry": False,
    }
    client = IoTHubModuleClient.create_from_sastoken(token, **options)
    await asyncio.sleep(2.1)
    try:
        with pytest.raises(ClientError):
            await client.connect()
    finally:
        await client.shutdown()


async def test_input_messages_wait_until_the_module_subscribes(
    sim: Simulator, module_client: ClientFactory
) -> None:
    sim.send_to_input(DEVICE, "consumer", "samples", {"n": 1}, {"schema": "s"})
    consumer = await module_client("consumer")
    received: Inbox[Message] = Inbox()
    consumer.on_message_received = received.put
    got = await received.get()
    assert (got.input_name, got.data, got.custom_properties) == (
        "samples",
        b'{"n": 1}',
        {"schema": "s"},
    )


@pytest.mark.filterwarnings(PAHO_RECONNECT_LEAK)
async def test_subscriptions_survive_a_dropped_connection(
    sim: Simulator, module_client: ClientFactory
) -> None:
    consumer = await module_client("consumer", connection_retry_interval=1)
    received: Inbox[Message] = Inbox()
    patches: Inbox[dict[str, Any]] = Inbox()
    consumer.on_message_received = received.put
    consumer.on_twin_desired_properties_patch_received = patches.put
    assert sim.faults.drop_connection(DEVICE, "consumer")
    await asyncio.to_thread(
        sim.events.wait_for_count, lambda e: e.kind == "connected", 2, timeout=20
    )
    sim.send_to_input(DEVICE, "consumer", "samples", "after reconnect")
    sim.update_desired(DEVICE, "consumer", {"threshold": 0.5})
    assert (await received.get()).data == b"after reconnect"
    assert await patches.get() == {"threshold": 0.5, "$version": 2}

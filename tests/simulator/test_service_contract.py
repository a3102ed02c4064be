"""The real azure-iot-hub service SDK against the simulator's REST API."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from azure.iot.device import MethodRequest, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from simulator import Simulator
from tests.simulator.conftest import DEVICE, ClientFactory
from tests.support.inbox import Inbox


def _status(error: pytest.ExceptionInfo[HttpOperationError]) -> int:
    return int(error.value.response.status_code)


def test_get_module_twin_shows_the_manifest_desired_properties(
    registry: IoTHubRegistryManager,
) -> None:
    twin = registry.get_module_twin(DEVICE, "producer")
    assert (twin.device_id, twin.module_id) == (DEVICE, "producer")
    assert twin.properties.desired == {
        "rate": 5,
        "model": {"name": "m", "version": 1},
        "$version": 1,
    }
    assert twin.etag
    assert twin.connection_state == "Disconnected"


def test_update_with_the_current_etag_changes_it_and_a_stale_one_is_refused(
    registry: IoTHubRegistryManager,
) -> None:
    first = registry.get_module_twin(DEVICE, "producer")
    patch = Twin(properties=TwinProperties(desired={"rate": 9}), tags={"ring": "canary"})
    updated = registry.update_module_twin(DEVICE, "producer", patch, first.etag)
    assert updated.etag != first.etag
    assert updated.properties.desired["rate"] == 9
    assert updated.properties.desired["$version"] == 2
    assert updated.tags == {"ring": "canary"}
    with pytest.raises(HttpOperationError) as refused:
        registry.update_module_twin(DEVICE, "producer", patch, first.etag)
    assert _status(refused) == 412


async def test_desired_update_through_rest_reaches_the_connected_module(
    registry: IoTHubRegistryManager, module_client: ClientFactory
) -> None:
    client = await module_client("producer")
    patches: Inbox[dict[str, Any]] = Inbox()
    client.on_twin_desired_properties_patch_received = patches.put
    patch = Twin(properties=TwinProperties(desired={"rate": 11}))
    await asyncio.to_thread(registry.update_module_twin, DEVICE, "producer", patch)
    assert await patches.get() == {"rate": 11, "$version": 2}
    twin = await asyncio.to_thread(registry.get_module_twin, DEVICE, "producer")
    assert twin.connection_state == "Connected"


async def test_replace_sends_removed_desired_properties_as_null(
    registry: IoTHubRegistryManager, module_client: ClientFactory
) -> None:
    client = await module_client("producer")
    patches: Inbox[dict[str, Any]] = Inbox()
    client.on_twin_desired_properties_patch_received = patches.put
    replacement = Twin(properties=TwinProperties(desired={"rate": 5, "drift": {"window": 10}}))
    replaced = await asyncio.to_thread(
        registry.replace_module_twin, DEVICE, "producer", replacement
    )
    assert replaced.properties.desired == {"rate": 5, "drift": {"window": 10}, "$version": 2}
    assert await patches.get() == {"model": None, "drift": {"window": 10}, "$version": 2}


def test_query_filters_on_desired_reported_and_tags_and_pages(
    registry: IoTHubRegistryManager,
) -> None:
    registry.update_module_twin(DEVICE, "consumer", Twin(tags={"ring": "canary"}))
    by_tag = registry.query_iot_hub(
        QuerySpecification(query="SELECT * FROM devices.modules WHERE tags.ring = 'canary'")
    )
    assert [item.module_id for item in by_tag.items] == ["consumer"]
    by_desired = registry.query_iot_hub(
        QuerySpecification(
            # a comparison with a missing tag is undefined, never true (IoT Hub semantics)
            query="SELECT * FROM devices.modules WHERE properties.desired.rate >= 5 "
            "AND (NOT IS_DEFINED(tags.ring) OR tags.ring != 'canary')"
        )
    )
    assert [item.module_id for item in by_desired.items] == ["producer"]
    everything = QuerySpecification(query="SELECT * FROM devices.modules")
    first = registry.query_iot_hub(everything, None, 1)
    assert first.continuation_token is not None
    second = registry.query_iot_hub(everything, first.continuation_token, 1)
    assert second.continuation_token is None
    assert {first.items[0].module_id, second.items[0].module_id} == {"producer", "consumer"}


def test_a_malformed_query_is_a_bad_request(registry: IoTHubRegistryManager) -> None:
    with pytest.raises(HttpOperationError) as refused:
        registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices.modules WHERE"))
    assert _status(refused) == 400


async def test_invoke_module_method_round_trip(
    registry: IoTHubRegistryManager, module_client: ClientFactory
) -> None:
    client = await module_client("consumer")

    async def answer(request: MethodRequest) -> None:
        response = MethodResponse.create_from_method_request(request, 200, {"ok": request.payload})
        await client.send_method_response(response)

    client.on_method_request_received = answer
    request = CloudToDeviceMethod(
        method_name="rollback", payload={"to": 3}, response_timeout_in_seconds=10
    )
    result = await asyncio.to_thread(
        registry.invoke_device_module_method, DEVICE, "consumer", request
    )
    assert (result.status, result.payload) == (200, {"ok": {"to": 3}})


def test_invoking_an_offline_module_is_not_found(registry: IoTHubRegistryManager) -> None:
    request = CloudToDeviceMethod(method_name="status", response_timeout_in_seconds=5)
    with pytest.raises(HttpOperationError) as refused:
        registry.invoke_device_module_method(DEVICE, "consumer", request)
    assert _status(refused) == 404


async def test_a_module_that_does_not_answer_times_out(
    registry: IoTHubRegistryManager, module_client: ClientFactory
) -> None:
    client = await module_client("consumer")
    ignored: Inbox[MethodRequest] = Inbox()
    client.on_method_request_received = ignored.put
    request = CloudToDeviceMethod(method_name="status", response_timeout_in_seconds=1)
    with pytest.raises(HttpOperationError) as refused:
        await asyncio.to_thread(registry.invoke_device_module_method, DEVICE, "consumer", request)
    assert _status(refused) == 504
    assert (await ignored.get()).name == "status"


def test_a_wrong_service_key_is_unauthorized(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sim.ca_cert_path))
    wrong = sim.service_connection_string.replace(sim.service_key, "B" * 43 + "=")
    manager = IoTHubRegistryManager.from_connection_string(wrong)
    try:
        with pytest.raises(HttpOperationError) as refused:
            manager.get_module_twin(DEVICE, "producer")
    finally:
        manager.amqp_svc_client.disconnect_sync()
    assert _status(refused) == 401


async def test_a_method_waits_connect_timeout_for_the_module_to_come_online(
    registry: IoTHubRegistryManager, module_client: ClientFactory
) -> None:
    request = CloudToDeviceMethod(
        method_name="status", response_timeout_in_seconds=10, connect_timeout_in_seconds=10
    )
    invocation = asyncio.ensure_future(
        asyncio.to_thread(registry.invoke_device_module_method, DEVICE, "consumer", request)
    )
    await asyncio.sleep(0.3)
    client = await module_client("consumer")

    async def answer(method: MethodRequest) -> None:
        await client.send_method_response(MethodResponse.create_from_method_request(method, 200))

    client.on_method_request_received = answer
    result = await asyncio.wait_for(invocation, 15)
    assert result.status == 200


def test_module_identities_carry_the_keys_in_the_connection_strings(
    sim: Simulator, registry: IoTHubRegistryManager
) -> None:
    module = registry.get_module(DEVICE, "producer")
    key = module.authentication.symmetric_key.primary_key
    assert f"SharedAccessKey={key}" in sim.module_connection_string(DEVICE, "producer")
    assert sorted(m.module_id for m in registry.get_modules(DEVICE)) == ["consumer", "producer"]

"""A fleet through the real azure-iot-hub SDK: device tags, IoT Edge layered deployments
(`IoTHubConfigurationManager`), metrics, and what a real module client of one device receives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    ConfigurationQueriesTestInput,
    Twin,
)
from msrest.exceptions import HttpOperationError

from simulator import Simulator, pick_loopback_host
from tests.simulator.conftest import collect_sdk_garbage
from tests.support.inbox import Inbox, sdk_message

pytestmark = pytest.mark.e2e

CANARY = ("plant-a", "plant-b")
BROAD = ("plant-c", "plant-d", "plant-e")
FLEET = {
    **{device: {"ring": "canary", "site": {"country": "FR"}} for device in CANARY},
    **{device: {"ring": "broad", "site": {"country": "DE"}} for device in BROAD},
}


@pytest.fixture
def fleet(tmp_path: Path, manifest: dict[str, Any]) -> Iterator[Simulator]:
    with Simulator.start(
        manifest, host=pick_loopback_host(), run_dir=tmp_path / "run", devices=FLEET
    ) as running:
        yield running
    collect_sdk_garbage()


@pytest.fixture
def registry(fleet: Simulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[IoTHubRegistryManager]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fleet.ca_cert_path))
    manager = IoTHubRegistryManager.from_connection_string(fleet.service_connection_string)
    yield manager
    manager.amqp_svc_client.disconnect_sync()


@pytest.fixture
def configs(fleet: Simulator, monkeypatch: pytest.MonkeyPatch) -> IoTHubConfigurationManager:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fleet.ca_cert_path))
    return IoTHubConfigurationManager.from_connection_string(fleet.service_connection_string)


def layer(
    config_id: str,
    target: str,
    priority: int,
    producer: dict[str, Any],
    metrics: dict[str, str] | None = None,
) -> Configuration:
    """A layered deployment setting the producer module's desired properties."""
    return Configuration(
        id=config_id,
        schema_version="1.0",
        target_condition=target,
        priority=priority,
        content=ConfigurationContent(modules_content={"producer": producer}),
        metrics=ConfigurationMetrics(queries=metrics or {}),
        labels={},
    )


def desired(registry: IoTHubRegistryManager, device: str) -> dict[str, Any]:
    twin = registry.get_module_twin(device, "producer")
    return {k: v for k, v in twin.properties.desired.items() if k != "$version"}


def _status(error: pytest.ExceptionInfo[HttpOperationError]) -> int:
    return int(error.value.response.status_code)


def _message(error: pytest.ExceptionInfo[HttpOperationError]) -> str:
    return str(error.value.response.json()["Message"])


def test_device_twins_carry_tags_and_patches_use_etags(
    fleet: Simulator, registry: IoTHubRegistryManager
) -> None:
    assert fleet.devices == [*CANARY, *BROAD]
    twin = registry.get_twin("plant-a")
    assert twin.tags == {"ring": "canary", "site": {"country": "FR"}}
    assert twin.capabilities.iot_edge is True
    updated = registry.update_twin("plant-a", Twin(tags={"ring": "broad"}), twin.etag)
    assert updated.tags == {"ring": "broad", "site": {"country": "FR"}}
    with pytest.raises(HttpOperationError) as stale:
        registry.update_twin("plant-a", Twin(tags={"ring": "x"}), twin.etag)
    assert _status(stale) == 412
    replaced = registry.replace_twin("plant-a", Twin(tags={"ring": "canary"}), updated.etag)
    assert replaced.tags == {"ring": "canary"}
    with pytest.raises(HttpOperationError) as missing:
        registry.get_twin("no-such-device")
    assert _status(missing) == 404


def test_layers_apply_by_priority_and_the_newest_wins_a_tie(
    configs: IoTHubConfigurationManager, registry: IoTHubRegistryManager
) -> None:
    configs.create_configuration(
        layer("model-v2", "tags.ring = 'canary'", 10, {"properties.desired.model.version": 2})
    )
    configs.create_configuration(
        layer(
            "rate-all",
            "tags.ring IN ['canary', 'broad']",
            20,
            {"properties.desired.rate": 9},
        )
    )
    assert desired(registry, "plant-a") == {"rate": 9, "model": {"name": "m", "version": 2}}
    assert desired(registry, "plant-c") == {"rate": 9, "model": {"name": "m", "version": 1}}

    # Same priority as model-v2, created later: it wins on the devices both target.
    configs.create_configuration(
        layer("model-v3", "tags.site.country = 'FR'", 10, {"properties.desired.model.version": 3})
    )
    assert desired(registry, "plant-a")["model"] == {"name": "m", "version": 3}
    # A whole-document layer of higher priority replaces everything below it.
    configs.create_configuration(
        layer("pinned", "deviceId = 'plant-b'", 30, {"properties.desired": {"pinned": True}})
    )
    assert desired(registry, "plant-b") == {"pinned": True}

    configs.delete_configuration("model-v3")
    assert desired(registry, "plant-a")["model"] == {"name": "m", "version": 2}
    configs.delete_configuration("model-v2")
    configs.delete_configuration("rate-all")
    configs.delete_configuration("pinned")
    for device in FLEET:
        assert desired(registry, device) == {"rate": 5, "model": {"name": "m", "version": 1}}


def test_tag_changes_and_priority_updates_retarget(
    configs: IoTHubConfigurationManager, registry: IoTHubRegistryManager
) -> None:
    configs.create_configuration(
        layer("canary-v2", "tags.ring = 'canary'", 10, {"properties.desired.model.version": 2})
    )
    assert desired(registry, "plant-c")["model"]["version"] == 1
    registry.update_twin("plant-c", Twin(tags={"ring": "canary"}))
    assert desired(registry, "plant-c")["model"]["version"] == 2
    registry.update_twin("plant-c", Twin(tags={"ring": None}))
    assert desired(registry, "plant-c")["model"]["version"] == 1

    # A direct write of the same path is overridden while the layer targets the device.
    registry.update_module_twin(
        "plant-a", "producer", Twin(properties={"desired": {"model": {"version": 7}, "x": 1}})
    )
    assert desired(registry, "plant-a") == {"rate": 5, "model": {"name": "m", "version": 2}, "x": 1}

    overriding = configs.create_configuration(
        layer("override", "tags.ring = 'canary'", 5, {"properties.desired.model.version": 4})
    )
    assert desired(registry, "plant-a")["model"]["version"] == 2  # priority 5 < 10
    overriding.priority = 50
    updated = configs.update_configuration(overriding, overriding.etag)
    assert updated.priority == 50
    assert desired(registry, "plant-a")["model"]["version"] == 4


def test_metrics_count_targeted_applied_and_custom_queries(
    fleet: Simulator, configs: IoTHubConfigurationManager, registry: IoTHubRegistryManager
) -> None:
    configs.create_configuration(
        layer(
            "canary-v2",
            "tags.ring = 'canary'",
            10,
            {"properties.desired.model.version": 2},
            metrics={
                "onV2": "SELECT deviceId FROM devices.modules WHERE moduleId = 'producer' "
                "AND properties.desired.model.version = 2",
                "reportedV2": "SELECT deviceId FROM devices.modules WHERE "
                "properties.reported.model.version = 2",
            },
        )
    )
    got = configs.get_configuration("canary-v2")
    assert got.system_metrics.results == {"targetedCount": 2, "appliedCount": 2}
    assert got.metrics.results == {"onV2": 2, "reportedV2": 0}
    assert got.created_time_utc is not None
    registry.update_twin("plant-e", Twin(tags={"ring": "canary"}))
    assert configs.get_configuration("canary-v2").system_metrics.results["targetedCount"] == 3
    # The SDK's Twin model drops `configurations`; the REST document carries it.
    assert fleet.device_twin("plant-e")["configurations"] == {"canary-v2": {"status": "Applied"}}
    rows = registry.query_iot_hub(
        {"query": "SELECT * FROM devices WHERE configurations.[[canary-v2]].status = 'Applied'"}
    ).items
    assert sorted(row.device_id for row in rows) == ["plant-a", "plant-b", "plant-e"]
    assert [c.id for c in configs.get_configurations()] == ["canary-v2"]


def test_base_deployments_and_apply_on_edge_device(
    fleet: Simulator,
    configs: IoTHubConfigurationManager,
    registry: IoTHubRegistryManager,
    manifest: dict[str, Any],
) -> None:
    content = manifest["modulesContent"]
    content["producer"] = {"properties.desired": {"rate": 1}}
    configs.apply_configuration_on_edge_device(
        "plant-d", ConfigurationContent(modules_content=content)
    )
    assert desired(registry, "plant-d") == {"rate": 1}
    base = {**content, "producer": {"properties.desired": {"rate": 2}}}
    configs.create_configuration(
        Configuration(
            id="base-de",
            target_condition="tags.site.country = 'DE'",
            priority=1,
            content=ConfigurationContent(modules_content=base),
        )
    )
    assert desired(registry, "plant-d") == {"rate": 2}
    losing = {**content, "producer": {"properties.desired": {"rate": 3}}}
    configs.create_configuration(
        Configuration(
            id="base-low",
            target_condition="tags.ring = 'broad'",
            priority=0,
            content=ConfigurationContent(modules_content=losing),
        )
    )
    assert desired(registry, "plant-d") == {"rate": 2}
    results = configs.get_configuration("base-low").system_metrics.results
    assert results == {"targetedCount": 3, "appliedCount": 0}
    assert fleet.device_twin("plant-d")["configurations"]["base-low"] == {"status": "Targeted"}


def test_configuration_queries_are_checked(configs: IoTHubConfigurationManager) -> None:
    answer = configs.test_configuration_queries(
        ConfigurationQueriesTestInput(
            target_condition="tags.ring = ",
            custom_metric_queries={
                "good": "SELECT deviceId FROM devices WHERE tags.ring = 'canary'",
                "bad": "SELECT deviceId FROM nowhere",
            },
        )
    )
    assert "tags.ring = " in answer.target_condition_error
    assert set(answer.custom_metric_query_errors) == {"bad"}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (
            layer("bad-target", "tags.ring = = 'x'", 1, {"properties.desired.rate": 1}),
            400,
            "ArgumentInvalid",
        ),
        (
            layer("bad-path", "tags.ring = 'x'", 1, {"properties.reported.rate": 1}),
            400,
            "ArgumentInvalid",
        ),
        (layer("bad-path", "tags.ring = 'x'", 1, {"rate": 1}), 400, "ArgumentInvalid"),
        (
            layer("Upper", "tags.ring = 'x'", 1, {"properties.desired.rate": 1}),
            400,
            "ArgumentInvalid",
        ),
        (
            layer("negative", "tags.ring = 'x'", -1, {"properties.desired.rate": 1}),
            400,
            "ArgumentInvalid",
        ),
        (
            layer("huge", "tags.ring = 'x'", 1, {"properties.desired.blob": "x" * 600_000}),
            413,
            "RequestEntityTooLarge",
        ),
        (
            layer("big-module", "tags.ring = 'x'", 1, {"properties.desired.blob": "x" * 40_000}),
            400,
            "ArgumentInvalid",
        ),
    ],
)
def test_bad_configurations_get_iot_hub_errors(
    configs: IoTHubConfigurationManager, body: Configuration, status: int, code: str
) -> None:
    with pytest.raises(HttpOperationError) as refused:
        configs.create_configuration(body)
    assert _status(refused) == status
    assert _message(refused).startswith(f"ErrorCode:{code};")
    assert refused.value.response.json()["ExceptionMessage"].startswith("Tracking ID:")


def test_configuration_etags_conflicts_and_missing(configs: IoTHubConfigurationManager) -> None:
    created = configs.create_configuration(
        layer("ring", "tags.ring = 'canary'", 1, {"properties.desired.rate": 1})
    )
    with pytest.raises(HttpOperationError) as exists:
        configs.create_configuration(
            layer("ring", "tags.ring = 'canary'", 1, {"properties.desired.rate": 1})
        )
    assert _status(exists) == 409
    created.priority = 2
    configs.update_configuration(created, created.etag)
    with pytest.raises(HttpOperationError) as stale:
        configs.update_configuration(created, created.etag)
    assert _status(stale) == 412
    assert _message(stale).startswith("ErrorCode:PreconditionFailed")
    with pytest.raises(HttpOperationError) as stale_delete:
        configs.delete_configuration("ring", created.etag)
    assert _status(stale_delete) == 412
    configs.delete_configuration("ring")
    with pytest.raises(HttpOperationError) as missing:
        configs.get_configuration("ring")
    assert _status(missing) == 404


@pytest.fixture
async def producer_of_plant_a(fleet: Simulator) -> AsyncIterator[IoTHubModuleClient]:
    client = IoTHubModuleClient.create_from_connection_string(
        fleet.module_connection_string("plant-a", "producer"),
        server_verification_cert=fleet.ca_cert_path.read_text(),
    )
    await client.connect()
    yield client
    await client.shutdown()


async def test_a_module_receives_exactly_its_devices_layer_patches(
    fleet: Simulator,
    configs: IoTHubConfigurationManager,
    producer_of_plant_a: IoTHubModuleClient,
) -> None:
    patches: Inbox[dict[str, Any]] = Inbox()
    producer_of_plant_a.on_twin_desired_properties_patch_received = patches.put
    broad = layer("broad-v2", "tags.ring = 'broad'", 10, {"properties.desired.model.version": 2})
    await asyncio.to_thread(configs.create_configuration, broad)
    canary = layer("canary-rate", "tags.ring = 'canary'", 10, {"properties.desired.rate": 8})
    await asyncio.to_thread(configs.create_configuration, canary)
    # The first patch plant-a sees is its own layer's: broad-v2 produced none here.
    assert await patches.get() == {"rate": 8, "$version": 2}
    await asyncio.to_thread(configs.delete_configuration, "canary-rate")
    assert await patches.get() == {"rate": 5, "$version": 3}
    await asyncio.to_thread(configs.delete_configuration, "broad-v2")
    await asyncio.sleep(0.5)
    assert patches.empty()
    twin = await producer_of_plant_a.get_twin()
    assert twin["desired"] == {"rate": 5, "model": {"name": "m", "version": 1}, "$version": 3}
    events = [e for e in fleet.events.items() if e.kind == "desired"]
    assert {e.device_id for e in events} == {"plant-a", "plant-b", "plant-c", "plant-d", "plant-e"}


async def test_each_device_routes_by_its_own_edge_hub_content(
    fleet: Simulator, configs: IoTHubConfigurationManager, manifest: dict[str, Any]
) -> None:
    content = manifest["modulesContent"]
    content["$edgeHub"]["properties.desired"]["routes"] = {}  # plant-b sends nothing upstream
    await asyncio.to_thread(
        configs.apply_configuration_on_edge_device,
        "plant-b",
        ConfigurationContent(modules_content=content),
    )
    clients = {}
    try:
        for device in ("plant-a", "plant-b"):
            client = IoTHubModuleClient.create_from_connection_string(
                fleet.module_connection_string(device, "consumer"),
                server_verification_cert=fleet.ca_cert_path.read_text(),
            )
            await client.connect()
            clients[device] = client
        await clients["plant-b"].send_message_to_output(sdk_message("b-1"), "predictions")
        await clients["plant-a"].send_message_to_output(sdk_message("a-1"), "predictions")
        first = await asyncio.to_thread(
            fleet.upstream.wait_for, lambda m: m.body in (b"a-1", b"b-1"), 10
        )
        assert (first.device_id, first.body) == ("plant-a", b"a-1")
        # A layered deployment adds a route to plant-b's edgeHub.
        route = {
            "properties.desired.routes.consumerUp": "FROM /messages/modules/consumer/outputs/* "
            "INTO $upstream"
        }
        await asyncio.to_thread(
            configs.create_configuration,
            Configuration(
                id="route-b",
                target_condition="deviceId = 'plant-b'",
                priority=5,
                content=ConfigurationContent(modules_content={"$edgeHub": route}),
            ),
        )
        await clients["plant-b"].send_message_to_output(sdk_message("b-2"), "predictions")
        second = await asyncio.to_thread(fleet.upstream.wait_for, lambda m: m.body == b"b-2", 10)
        assert second.device_id == "plant-b"
        assert not [m for m in fleet.upstream.items() if m.body == b"b-1"]
    finally:
        for client in clients.values():
            await client.shutdown()

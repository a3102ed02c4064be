"""Fixtures: a simulator per test on its own loopback address, and real SDK clients against it."""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.hub import IoTHubRegistryManager

from simulator import Simulator, pick_loopback_host
from tests.support.azurite import azurite  # noqa: F401  # the session fixture, for the tests here

DEVICE = "edge-device"

# paho-mqtt 1.6 (pinned by the SDK) overwrites its wake-up socket pair in loop_start() on every
# reconnect without closing the old one; the garbage-collected sockets surface as this warning.
PAHO_RECONNECT_LEAK = (
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)

MANIFEST: dict[str, Any] = {
    "modulesContent": {
        "$edgeAgent": {
            "properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {}},
                "systemModules": {"edgeAgent": {}, "edgeHub": {}},
                "modules": {"producer": {"type": "docker"}, "consumer": {"type": "docker"}},
            }
        },
        "$edgeHub": {
            "properties.desired": {
                "schemaVersion": "1.1",
                "routes": {
                    "producerToConsumer": (
                        "FROM /messages/modules/producer/outputs/samples "
                        'INTO BrokeredEndpoint("/modules/consumer/inputs/samples")'
                    ),
                    "alertsUpstream": {
                        "route": "FROM /messages/modules/producer/outputs/alerts "
                        "WHERE severity = 'high' OR level > 3 INTO $upstream",
                        "priority": 0,
                        "timeToLiveSecs": 86400,
                    },
                    "consumerUpstream": "FROM /messages/modules/consumer/outputs/* INTO $upstream",
                },
                "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
            }
        },
        "producer": {"properties.desired": {"rate": 5, "model": {"name": "m", "version": 1}}},
        "consumer": {"properties.desired": {}},
    }
}


@pytest.fixture
def manifest() -> dict[str, Any]:
    return copy.deepcopy(MANIFEST)


def collect_sdk_garbage() -> None:
    """Collect what shut-down SDK clients left behind, now, where the warning is expected.

    paho-mqtt 1.6 leaks its wake-up socket pair whenever a connection ends unexpectedly; if the
    garbage collector found those sockets during some later test, that test would fail on the
    ResourceWarning. Run after the clients are shut down, when only their garbage is left.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed <socket.socket", ResourceWarning)
        gc.collect()


@pytest.fixture
def sim(tmp_path: Path, manifest: dict[str, Any]) -> Iterator[Simulator]:
    with Simulator.start(manifest, host=pick_loopback_host(), run_dir=tmp_path / "run") as running:
        yield running
    collect_sdk_garbage()


ClientFactory = Callable[..., Awaitable[IoTHubModuleClient]]


@pytest.fixture
async def module_client(sim: Simulator) -> AsyncIterator[ClientFactory]:
    """Connect real aio module clients (with GatewayHostName and the CA); all shut down after."""
    clients: list[IoTHubModuleClient] = []

    async def connect(module: str, **kwargs: Any) -> IoTHubModuleClient:
        client = IoTHubModuleClient.create_from_connection_string(
            sim.module_connection_string(DEVICE, module),
            server_verification_cert=sim.ca_cert_path.read_text(),
            **kwargs,
        )
        clients.append(client)
        await client.connect()
        return client

    yield connect
    for client in clients:
        await client.shutdown()


@pytest.fixture
def registry(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[IoTHubRegistryManager]:
    """The real service SDK; it trusts the simulator CA through REQUESTS_CA_BUNDLE."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sim.ca_cert_path))
    manager = IoTHubRegistryManager.from_connection_string(sim.service_connection_string)
    yield manager
    manager.amqp_svc_client.disconnect_sync()

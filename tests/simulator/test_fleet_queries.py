"""Twin queries over 1,000 edge devices through the real SDK's `query_iot_hub`, page by page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import QuerySpecification

from simulator import Simulator, pick_loopback_host
from tests.simulator.conftest import MANIFEST

pytestmark = pytest.mark.e2e

DEVICES = 1000
FLEET = {
    f"edge-{n:04d}": {"ring": "canary" if n % 10 == 0 else "broad", "rack": n // 100}
    for n in range(DEVICES)
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    run_dir: Path = tmp_path_factory.mktemp("fleet-queries")
    with Simulator.start(
        MANIFEST, host=pick_loopback_host(), run_dir=run_dir, devices=FLEET
    ) as running:
        yield running


@pytest.fixture(scope="module")
def registry(sim: Simulator) -> Iterator[IoTHubRegistryManager]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(sim.ca_cert_path))
        manager = IoTHubRegistryManager.from_connection_string(sim.service_connection_string)
        yield manager
        manager.amqp_svc_client.disconnect_sync()


def query_all(registry: IoTHubRegistryManager, text: str, page_size: int) -> list[Any]:
    items: list[Any] = []
    token: str | None = None
    pages = 0
    while True:
        result = registry.query_iot_hub(QuerySpecification(query=text), token, page_size)
        items.extend(result.items)
        pages += 1
        assert len(result.items) <= page_size
        token = result.continuation_token
        if not token:
            return items
        assert pages <= DEVICES  # a token that never ends would loop forever


@pytest.mark.parametrize(
    ("text", "page_size", "expected"),
    [
        ("SELECT * FROM devices", 100, DEVICES),
        ("SELECT * FROM devices WHERE tags.ring = 'canary'", 30, DEVICES // 10),
        ("SELECT * FROM devices WHERE tags.rack IN [1, 2] AND tags.ring = 'broad'", 1000, 180),
        ("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'edge-00')", 7, 100),
        ("SELECT * FROM devices.modules WHERE moduleId = 'producer'", 250, DEVICES),
        ("SELECT * FROM devices.modules", 1000, 2 * DEVICES),
    ],
)
def test_fleet_queries_page_through_every_match(
    registry: IoTHubRegistryManager, text: str, page_size: int, expected: int
) -> None:
    items = query_all(registry, text, page_size)
    keys = {(item.device_id, item.module_id) for item in items}
    assert len(items) == len(keys) == expected


def test_projections_and_counts_answer_at_fleet_size(sim: Simulator) -> None:
    # The SDK reads every row as a Twin, so projections are checked on the simulator's own API.
    count = sim.query("SELECT COUNT() AS n FROM devices WHERE tags.ring = 'canary'")
    assert count == [{"n": 100}]
    rows = sim.query("SELECT deviceId, tags.rack FROM devices WHERE tags.rack = 9")
    assert rows[0] == {"deviceId": "edge-0900", "rack": 9}
    assert len(rows) == 100

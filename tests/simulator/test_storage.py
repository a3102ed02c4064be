"""Routing to a Blob storage endpoint: records, names, batching; then real modules of a fleet
through the simulator into Azurite, read back with azure-storage-blob."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device.aio import IoTHubModuleClient
from azure.storage.blob import BlobServiceClient

from simulator import Simulator, StorageRoute, pick_loopback_host
from simulator.azurite import Azurite
from simulator.storage import (
    StorageRouteError,
    StorageWriter,
    blob_name,
    message_lookup,
    partition_of,
    record,
)
from simulator.topics import Message
from tests.simulator.conftest import collect_sdk_garbage
from tests.support.inbox import sdk_message

JSON_SYSTEM = {
    "contentType": "application/json",
    "contentEncoding": "utf-8",
    "connectionDeviceId": "plant-a",
    "connectionModuleId": "consumer",
}
AT = dt.datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=dt.UTC)


def route(**overrides: Any) -> StorageRoute:
    settings: dict[str, Any] = {
        "name": "r",
        "connection_string": "UseDevelopmentStorage=true",
        "container": "c",
    }
    return StorageRoute(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("file_name_format", "expected"),
    [
        (None, "hub/2/2026/03/04/05/06"),
        ("{iothub}/{YYYY}-{MM}-{DD}/{HH}{mm}/p{partition}.json", "hub/2026-03-04/0506/p2.json"),
    ],
)
def test_blob_names_follow_the_file_name_format(
    file_name_format: str | None, expected: str
) -> None:
    chosen = (
        route(hub_name="hub")
        if file_name_format is None
        else route(hub_name="hub", file_name_format=file_name_format)
    )
    assert blob_name(chosen, 2, AT) == expected


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"file_name_format": "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}"}, r"lacks \{mm\}"),
        ({"encoding": "avro"}, "only JSON"),
        ({"batch_frequency_seconds": 0}, "positive"),
        ({"max_chunk_bytes": -1}, "positive"),
        ({"condition": "level > > 3"}, "condition"),
        ({"condition": "true false"}, "condition"),
    ],
)
def test_bad_storage_routes_are_refused(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(StorageRouteError, match=reason):
        route(**overrides)


def test_a_json_body_is_stored_as_json_and_anything_else_as_base64() -> None:
    stored = json.loads(record(Message(b'{"drift": 0.2}', JSON_SYSTEM, {"kind": "drift"}), AT))
    assert stored["Body"] == {"drift": 0.2}
    assert stored["Properties"] == {"kind": "drift"}
    assert stored["EnqueuedTimeUtc"] == "2026-03-04T05:06:07.890Z"
    assert stored["SystemProperties"]["connectionDeviceId"] == "plant-a"
    assert stored["SystemProperties"]["connectionModuleId"] == "consumer"
    binary = Message(b"\x00\x01", {"contentType": "application/octet-stream"})
    assert json.loads(record(binary, AT))["Body"] == base64.b64encode(b"\x00\x01").decode()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("$body.drift", 0.2),
        ("$body.window.size", 10),
        ("$body.window", None),  # an object does not compare: undefined
        ("$connectionDeviceId", "plant-a"),
        ("kind", "drift"),
        ("missing", None),
        ("$twin.tags.ring", "canary"),
        ("$twin.tags.missing", None),
    ],
)
def test_routing_queries_see_body_system_application_and_twin_properties(
    name: str, value: object
) -> None:
    message = Message(b'{"drift": 0.2, "window": {"size": 10}}', JSON_SYSTEM, {"kind": "drift"})
    found = message_lookup(message, {"tags": {"ring": "canary"}})(name)
    assert (None if not isinstance(found, str | int | float | bool) else found) == value


def test_partitions_are_stable_and_in_range() -> None:
    assert partition_of("plant-a", 4) == partition_of("plant-a", 4)
    assert {partition_of(f"d{n}", 4) for n in range(100)} == {0, 1, 2, 3}


class MemoryBlobs:
    """Uploads kept in memory (appending, as the real uploader does on a repeated name)."""

    def __init__(self, fail: int = 0) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fail = fail

    def __call__(self, _route: StorageRoute, name: str, data: bytes) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("storage unreachable")
        self.blobs[name] = self.blobs.get(name, b"") + data


async def test_batches_are_cut_by_size_per_partition_and_flushed_by_time() -> None:
    blobs = MemoryBlobs()
    writer = StorageWriter(
        route(max_chunk_bytes=600, condition="$body.kind = 'drift'", hub_name="h"),
        upload=blobs,
        clock=AT.timestamp,
    )
    drift = Message(b'{"kind": "drift"}', JSON_SYSTEM)
    other = Message(b'{"kind": "other"}', JSON_SYSTEM)
    assert writer.add(other) is False
    full = [writer.add(drift) for _ in range(5)]
    assert full[-1] is True  # the fifth record passes 600 bytes
    await writer.flush(full_only=True)
    name = blob_name(writer.route, partition_of("plant-a", 4), AT)
    assert list(blobs.blobs) == [name]
    assert len(blobs.blobs[name].splitlines()) == 5
    writer.add(drift)
    await writer.flush()
    assert len(blobs.blobs[name].splitlines()) == 6
    assert (writer.written_blobs, writer.written_records) == (2, 6)


async def test_a_failed_upload_is_retried_at_the_next_flush() -> None:
    blobs = MemoryBlobs(fail=1)
    writer = StorageWriter(route(), upload=blobs, clock=AT.timestamp)
    writer.add(Message(b"{}", JSON_SYSTEM))
    await writer.flush()
    assert blobs.blobs == {}
    await writer.flush()
    assert len(blobs.blobs) == 1
    assert writer.written_records == 1


# ---------------------------------------------------------------- end to end, through Azurite


@pytest.fixture
def routed(
    tmp_path: Path, manifest: dict[str, Any], azurite: Azurite
) -> Iterator[tuple[Simulator, str]]:
    container = f"telemetry-{time.monotonic_ns()}"
    # An IoT Hub storage endpoint names an existing container.
    BlobServiceClient.from_connection_string(azurite.connection_string).create_container(container)
    storage = StorageRoute(
        name="drift-to-blob",
        connection_string=azurite.connection_string,
        container=container,
        condition="($body.kind = 'drift' OR severity = 'high') AND $twin.tags.ring != 'lab'",
        batch_frequency_seconds=0.5,
        hub_name="sim-hub",
    )
    with Simulator.start(
        manifest,
        host=pick_loopback_host(),
        run_dir=tmp_path / "run",
        devices={
            "plant-a": {"ring": "canary"},
            "plant-b": {"ring": "broad"},
            "lab-1": {"ring": "lab"},
        },
        storage_routes=[storage],
    ) as sim:
        yield sim, container
    collect_sdk_garbage()


def _records(azurite: Azurite, container: str) -> dict[str, list[dict[str, Any]]]:
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    blobs = client.get_container_client(container)
    return {
        blob.name: [
            json.loads(line) for line in blobs.download_blob(blob.name).readall().splitlines()
        ]
        for blob in blobs.list_blobs()
    }


@pytest.mark.e2e
async def test_upstream_messages_matching_the_route_land_in_azurite(
    routed: tuple[Simulator, str], azurite: Azurite
) -> None:
    sim, container = routed
    clients = []
    try:
        for device in ("plant-a", "plant-b", "lab-1"):
            client = IoTHubModuleClient.create_from_connection_string(
                sim.module_connection_string(device, "consumer"),
                server_verification_cert=sim.ca_cert_path.read_text(),
            )
            clients.append(client)
            await client.connect()
            drift = sdk_message(
                json.dumps({"kind": "drift", "device": device}),
                content_type="application/json",
                content_encoding="utf-8",
            )
            await client.send_message_to_output(drift, "profiles")
            await client.send_message_to_output(sdk_message("ignored"), "predictions")
    finally:
        for client in clients:
            await client.shutdown()
    # The 0.5 s batch frequency writes without being asked; lab-1's drift stays out (its twin).
    deadline = time.monotonic() + 30
    while sum(len(r) for r in _records(azurite, container).values()) < 2:
        assert time.monotonic() < deadline, "no blob within 30 s"
        await asyncio.sleep(0.2)
    records = _records(azurite, container)
    stored = sorted(
        (r["SystemProperties"]["connectionDeviceId"], r["Body"]["device"])
        for lines in records.values()
        for r in lines
    )
    assert stored == [("plant-a", "plant-a"), ("plant-b", "plant-b")]
    today = dt.datetime.now(dt.UTC)
    for name in records:
        hub, partition, year, *_ = name.split("/")
        assert (hub, year) == ("sim-hub", f"{today.year:04d}")
        assert partition in {"0", "1", "2", "3"}
        assert len(name.split("/")) == 7

"""IoT Hub message routing to a Blob storage endpoint, through the real azure-storage-blob SDK.

A `StorageRoute` is an IoT Hub route (a condition over device-to-cloud messages) into a storage
endpoint (a container). As IoT Hub's storage endpoint does, messages are batched per partition
and written when the batch frequency elapses or the batch reaches the chunk size, one blob per
batch named by the file name format (`{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}`, every
token required, order free), JSON encoded: one JSON record per line with `EnqueuedTimeUtc`,
`Properties`, `SystemProperties` and `Body` (the JSON itself when the message says
`application/json` in UTF-8, else base64). A second batch that lands on the same name (a
frequency under a minute, which IoT Hub does not allow but tests need) is appended to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobBlock, BlobServiceClient, ContainerClient

from simulator import expressions, topics
from simulator import query as twin_query

log = structlog.get_logger(__name__)

DEFAULT_FILE_NAME_FORMAT = "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}"
FILE_NAME_TOKENS = ("{iothub}", "{partition}", "{YYYY}", "{MM}", "{DD}", "{HH}", "{mm}")
DEFAULT_BATCH_FREQUENCY_SECONDS = 300.0  # IoT Hub: 60..720, default 300
DEFAULT_MAX_CHUNK_BYTES = 314_572_800  # IoT Hub: 10..500 MB, default 300 MB
DEFAULT_PARTITIONS = 4  # IoT Hub's default device-to-cloud partition count
DEFAULT_HUB_NAME = "edge-mlops-simulator"
MAX_PENDING_BATCHES = 64  # per endpoint, while storage is unreachable; older ones are dropped


class StorageRouteError(ValueError):
    """A storage route IoT Hub would refuse to save."""


@dataclass(frozen=True)
class StorageRoute:
    """A route `condition` (IoT Hub routing query; empty: every message) into `container`."""

    name: str
    connection_string: str
    container: str
    condition: str = ""
    file_name_format: str = DEFAULT_FILE_NAME_FORMAT
    batch_frequency_seconds: float = DEFAULT_BATCH_FREQUENCY_SECONDS
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    encoding: str = "json"
    hub_name: str = DEFAULT_HUB_NAME
    partitions: int = DEFAULT_PARTITIONS
    parsed: expressions.Expr | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        missing = [token for token in FILE_NAME_TOKENS if token not in self.file_name_format]
        if missing:
            raise StorageRouteError(
                f"route {self.name!r}: file name format lacks {', '.join(missing)}"
            )
        if self.encoding.lower() != "json":
            raise StorageRouteError(f"route {self.name!r}: only JSON encoding is simulated")
        if self.batch_frequency_seconds <= 0 or self.max_chunk_bytes <= 0 or self.partitions < 1:
            raise StorageRouteError(f"route {self.name!r}: batching values must be positive")
        try:
            parsed = expressions.parse(self.condition) if self.condition.strip() else None
        except expressions.ExpressionError as exc:
            raise StorageRouteError(f"route {self.name!r}: condition: {exc}") from exc
        object.__setattr__(self, "parsed", parsed)

    def matches(self, message: topics.Message, twin: Mapping[str, object] | None = None) -> bool:
        if self.parsed is None:
            return True
        return expressions.matches(self.parsed, message_lookup(message, twin))


def message_lookup(
    message: topics.Message, twin: Mapping[str, object] | None = None
) -> expressions.Lookup:
    """Routing query names: `$name` system properties, `$body.path` in a JSON body,
    `$twin.path` in the sending device's twin (`$twin.tags.ring`), else application
    properties."""

    def lookup(name: str) -> expressions.Value | expressions._Undefined:
        if name.startswith("$body."):
            return _body_value(message, name[len("$body.") :])
        if name.startswith("$twin."):
            if twin is None:
                return expressions.UNDEFINED
            return twin_query.path_lookup(twin)(name[len("$twin.") :])
        if name.startswith("$"):
            value = message.system.get(name[1:])
        else:
            value = message.properties.get(name)
        return expressions.UNDEFINED if value is None else value

    return lookup


def _json_body(message: topics.Message) -> Any:
    if message.system.get("contentType", "").split(";")[0].strip() != "application/json":
        return expressions.UNDEFINED
    if message.system.get("contentEncoding", "").lower() not in ("utf-8", "utf8"):
        return expressions.UNDEFINED
    try:
        return json.loads(message.body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return expressions.UNDEFINED


def _body_value(message: topics.Message, path: str) -> expressions.Value | expressions._Undefined:
    node = _json_body(message)
    for part in expressions.split_path(path):
        if not isinstance(node, Mapping) or part not in node:
            return expressions.UNDEFINED
        node = node[part]
    if node is None or isinstance(node, str | int | float | bool):
        return node
    return expressions.UNDEFINED


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def record(message: topics.Message, enqueued: dt.datetime) -> bytes:
    """One message as a JSON-encoded storage record (one line)."""
    body = _json_body(message)
    system = {
        "connectionDeviceId": message.system.get("connectionDeviceId", ""),
        "connectionModuleId": message.system.get("connectionModuleId", ""),
        "connectionAuthMethod": json.dumps(
            {"scope": "module", "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": None}
        ),
        "connectionDeviceGenerationId": "1",
        "enqueuedTime": _iso(enqueued),
    }
    for name in ("contentType", "contentEncoding", "messageId", "correlationId"):
        if name in message.system:
            system[name] = message.system[name]
    document = {
        "EnqueuedTimeUtc": _iso(enqueued),
        "Properties": dict(message.properties),
        "SystemProperties": system,
        "Body": (
            base64.b64encode(message.body).decode("ascii")
            if isinstance(body, expressions._Undefined)
            else body
        ),
    }
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def partition_of(device_id: str, partitions: int) -> int:
    """A device's partition: stable, as IoT Hub hashes the device id."""
    return zlib.crc32(device_id.encode()) % partitions


def blob_name(route: StorageRoute, partition: int, start: dt.datetime) -> str:
    """The blob name of a batch that started at `start` (UTC)."""
    values = {
        "{iothub}": route.hub_name,
        "{partition}": str(partition),
        "{YYYY}": f"{start.year:04d}",
        "{MM}": f"{start.month:02d}",
        "{DD}": f"{start.day:02d}",
        "{HH}": f"{start.hour:02d}",
        "{mm}": f"{start.minute:02d}",
    }
    name = route.file_name_format
    for token, value in values.items():
        name = name.replace(token, value)
    return name


@dataclass
class _Batch:
    started: dt.datetime
    records: list[bytes] = field(default_factory=list)
    size: int = 0


Upload = Callable[[StorageRoute, str, bytes], None]


class BlobUploader:
    """Writes a batch as a block blob with the real SDK (blocking: run it in a thread)."""

    def __init__(self) -> None:
        self._containers: dict[tuple[str, str], ContainerClient] = {}

    def _container(self, route: StorageRoute) -> ContainerClient:
        key = (route.connection_string, route.container)
        if key not in self._containers:
            service = BlobServiceClient.from_connection_string(route.connection_string)
            container = service.get_container_client(route.container)
            # IoT Hub needs the container to exist; creating it spares every demo a step.
            with contextlib.suppress(ResourceExistsError):
                container.create_container()
            self._containers[key] = container
        return self._containers[key]

    def __call__(self, route: StorageRoute, name: str, data: bytes) -> None:
        blob = self._container(route).get_blob_client(name)
        block_id = base64.b64encode(uuid.uuid4().bytes).decode("ascii")
        blob.stage_block(block_id, data)
        committed: list[BlobBlock] = []
        if blob.exists():
            committed = [BlobBlock(block.id) for block in blob.get_block_list("committed")[0]]
        blob.commit_block_list([*committed, BlobBlock(block_id)])


class StorageWriter:
    """Batches routed messages per partition and uploads them; lives on the simulator loop."""

    def __init__(
        self,
        route: StorageRoute,
        *,
        upload: Upload,
        clock: Callable[[], float],
    ) -> None:
        self.route = route
        self._upload = upload
        self._clock = clock
        self._batches: dict[int, _Batch] = {}
        self._pending: list[tuple[str, bytes, int]] = []
        self._lock = asyncio.Lock()
        self.written_blobs = 0
        self.written_records = 0
        self.dropped_batches = 0

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC)

    def add(self, message: topics.Message, twin: Mapping[str, object] | None = None) -> bool:
        """Take the message if the route's condition matches (over the message and its
        device's `twin`); True when the chunk is full."""
        if not self.route.matches(message, twin):
            return False
        now = self._now()
        device = message.system.get("connectionDeviceId", "")
        partition = partition_of(device, self.route.partitions)
        batch = self._batches.setdefault(partition, _Batch(now))
        line = record(message, now)
        batch.records.append(line)
        batch.size += len(line)
        return batch.size >= self.route.max_chunk_bytes

    def _cut(self, full_only: bool) -> None:
        for partition, batch in list(self._batches.items()):
            if full_only and batch.size < self.route.max_chunk_bytes:
                continue
            del self._batches[partition]
            name = blob_name(self.route, partition, batch.started)
            self._pending.append((name, b"".join(batch.records), len(batch.records)))
        if len(self._pending) > MAX_PENDING_BATCHES:
            dropped = len(self._pending) - MAX_PENDING_BATCHES
            self.dropped_batches += dropped
            del self._pending[:dropped]
            log.warning("storage_batches_dropped", route=self.route.name, count=dropped)

    async def flush(self, *, full_only: bool = False) -> None:
        """Upload the batches (only full ones if `full_only`); a failed upload stays pending."""
        self._cut(full_only)
        async with self._lock:
            while self._pending:
                name, data, count = self._pending[0]
                try:
                    await asyncio.to_thread(self._upload, self.route, name, data)
                except Exception as exc:  # any SDK or network failure: retry later
                    log.warning("storage_upload_failed", route=self.route.name, error=str(exc))
                    return
                self._pending.pop(0)
                self.written_blobs += 1
                self.written_records += count
                log.info("storage_blob_written", route=self.route.name, blob=name, bytes=len(data))

    async def run(self) -> None:
        """Flush every batch frequency until cancelled."""
        while True:
            await asyncio.sleep(self.route.batch_frequency_seconds)
            await self.flush()

"""Outbox: telemetry and alerts leave the device at least once, and never wedge the agent.

`put()` is synchronous and never waits for the hub: inference and the drift monitor must not
block on a dead connection. Messages wait in a bounded in-memory FIFO; when it is full the
oldest ones move to a bounded on-disk spool, and when the spool is full the oldest spooled
message is dropped and counted. One sender sends the oldest message first, one at a time (so
the order holds), with a timeout on every send (a hung SDK call is a known failure mode), and
keeps a failed message at the head until the hub takes it. Every message carries a uuid4 id so
the hub side can de-duplicate what a retry sends twice.

Every message gets a sequence number when it is put; spool files are named by it, so sorting
the directory gives the order, and a restart continues after the highest number it finds.
Order is always: the message in flight, then the spool, then memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, get_args
from uuid import uuid4

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.releases.store import ensure_writable_dir

log = structlog.get_logger(__name__)

DropReason = Literal["too_large", "spool_full", "corrupt", "not_json"]
OUTPUT_LABELS: Final = frozenset({"telemetry", "alerts", "predictions"})
_OTHER_OUTPUT: Final = "other"

# `<sequence, 20 digits>.msg`: fixed width so that name order is message order.
_SPOOL_NAME: Final = re.compile(r"(\d{20})\.msg")
_TEMP_SUFFIX: Final = ".tmp"
_HEADER_FIELDS: Final = ("output", "message_id", "schema", "created")


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    output: str  # route output name: "telemetry" | "alerts" | ...
    body: bytes  # UTF-8 JSON
    message_id: str  # uuid4 hex: the hub side de-duplicates on it (at-least-once)
    schema: str  # e.g. "agent-telemetry/1"; sent as a message property
    created: str  # ISO 8601 UTC


Send = Callable[[OutboundMessage], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Entry:
    """A message held in memory, with its place in the order."""

    seq: int
    message: OutboundMessage


@dataclass(frozen=True, slots=True)
class _SpoolFile:
    """A message on disk, read only when it is its turn to be sent."""

    seq: int
    path: Path
    size: int


@dataclass(slots=True)
class _InFlight:
    """The head message: kept here until the hub takes it, whatever the number of retries."""

    seq: int
    message: OutboundMessage
    spooled: _SpoolFile | None  # its file stays on disk until it is sent


class Outbox:
    """Service owned by the module: `put()` from anywhere on the loop, `run()` in the task group,
    `drain()` at shutdown after `run()` has been cancelled."""

    def __init__(
        self,
        send: Send,
        spool_dir: Path,
        *,
        registry: CollectorRegistry,
        max_queue: int = 1000,
        max_spool_bytes: int = 16 << 20,
        max_message_bytes: int = 255 * 1024,  # IoT Hub's 256 KB cap, less room for properties
        send_timeout_s: float = 10.0,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.time,  # wall clock: `created` and outage lengths
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if send_timeout_s <= 0 or retry_s <= 0:
            raise ValueError(f"timeouts must be positive, got {send_timeout_s}, {retry_s}")
        self._send = send
        self._spool_dir = spool_dir
        self._max_queue = max_queue
        self._max_spool_bytes = max_spool_bytes
        self._max_message_bytes = max_message_bytes
        self._send_timeout_s = send_timeout_s
        self._retry_s = retry_s
        self._clock = clock
        self._sleep = sleep

        self._memory: deque[_Entry] = deque()
        self._spool: deque[_SpoolFile] = deque()
        self._spool_bytes = 0
        self._current: _InFlight | None = None
        self._next_seq = 0
        self._wake = asyncio.Event()
        self._running = False
        self._outage_started: float | None = None  # set while sends fail: log once per outage
        self._outage_failures = 0
        self._dropping = False  # set while the spool is full: log the first drop only

        self._sent = Counter(
            "agent_outbox_sent_total",
            "Messages the hub accepted, by route output.",
            ["output"],
            registry=registry,
        )
        self._dropped = Counter(
            "agent_outbox_dropped_total",
            "Messages given up on, by reason.",
            ["reason"],
            registry=registry,
        )
        self._failures = Counter(
            "agent_outbox_send_failures_total",
            "Sends that failed or timed out (each retry counts).",
            registry=registry,
        )
        for output in (*sorted(OUTPUT_LABELS), _OTHER_OUTPUT):
            self._sent.labels(output)
        for reason in get_args(DropReason):
            self._dropped.labels(reason)
        queued = Gauge("agent_outbox_queued", "Messages waiting in memory.", registry=registry)
        queued.set_function(lambda: self.queued)
        spooled = Gauge("agent_outbox_spooled", "Messages in the disk spool.", registry=registry)
        spooled.set_function(lambda: self.spooled)

        self._recover_spool()

    @property
    def queued(self) -> int:
        """Messages held in memory (the one in flight included)."""
        in_flight = self._current is not None and self._current.spooled is None
        return len(self._memory) + in_flight

    @property
    def spooled(self) -> int:
        """Messages in the disk spool (the one in flight included)."""
        in_flight = self._current is not None and self._current.spooled is not None
        return len(self._spool) + in_flight

    def put(self, output: str, payload: Mapping[str, object], schema: str) -> bool:
        """Queue `payload` for the `output` route; False if refused (not JSON, too large)."""
        try:
            body = json.dumps(
                payload, allow_nan=False, ensure_ascii=False, separators=(",", ":")
            ).encode()
        except (TypeError, ValueError, RecursionError) as error:
            # ValueError: NaN/Infinity or a circular reference; RecursionError: absurd nesting.
            self._drop("not_json", output=output, schema=schema, error=str(error))
            return False
        if len(body) > self._max_message_bytes:
            # Refused here, never queued: the hub would reject it forever and wedge the queue.
            self._drop(
                "too_large",
                output=output,
                schema=schema,
                size=len(body),
                limit=self._max_message_bytes,
            )
            return False
        created = datetime.fromtimestamp(self._clock(), tz=UTC)
        message = OutboundMessage(
            output=output,
            body=body,
            message_id=uuid4().hex,
            schema=schema,
            created=created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        self._memory.append(_Entry(self._next_seq, message))
        self._next_seq += 1
        while self.queued > self._max_queue and self._memory:
            self._spill(self._memory.popleft())
        self._wake.set()
        return True

    async def run(self) -> None:
        """Send the oldest message, one at a time, until cancelled."""
        if self._running:
            raise RuntimeError("Outbox.run() is already running")
        self._running = True
        try:
            while True:
                if self._current is None and not self._take_next():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not await self._send_current(self._send_timeout_s):
                    # Jitter so that modules restarted together do not retry in step.
                    jitter = random.uniform(0.8, 1.2)  # noqa: S311 -- jitter, not security
                    await self._sleep(self._retry_s * jitter)
        finally:
            # The message in flight stays in `_current`: a later run() or drain() resumes it.
            self._running = False

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: send what can go within `timeout_s`, then spool everything left in memory.

        Call it after `run()` has finished (one send in flight at a time). It does not retry:
        if the hub fails now the grace is better spent exiting, and the spool survives.
        """
        if self._running:
            raise RuntimeError("cancel Outbox.run() before drain()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            if self._current is None and not self._take_next():
                break
            if not await self._send_current(min(self._send_timeout_s, remaining)):
                break
        self._spool_the_rest()

    # -- sending ---------------------------------------------------------------------------

    def _take_next(self) -> bool:
        """Make the oldest message the one in flight: the spool first (it is older). False if
        there is none."""
        while self._spool:
            spooled = self._spool.popleft()
            message = self._read_spooled(spooled)
            if message is not None:
                self._current = _InFlight(spooled.seq, message, spooled)
                return True
        if self._memory:
            entry = self._memory.popleft()
            self._current = _InFlight(entry.seq, entry.message, None)
            return True
        return False

    async def _send_current(self, timeout_s: float) -> bool:
        """One attempt at the message in flight; True if the hub took it."""
        assert self._current is not None
        message = self._current.message
        try:
            async with asyncio.timeout(timeout_s):
                await self._send(message)
        except Exception as error:  # hub down, connection lost, or a hung send timed out
            self._failures.inc()
            self._outage_failures += 1
            if self._outage_started is None:
                self._outage_started = self._clock()
                log.warning(
                    "outbox_send_failing",
                    error=str(error) or type(error).__name__,
                    error_type=type(error).__name__,
                    output=message.output,
                    queued=self.queued,
                    spooled=self.spooled,
                )
            return False
        self._sent.labels(_output_label(message.output)).inc()
        if self._current.spooled is not None:
            self._remove_spooled(self._current.spooled)
        self._current = None
        if self._outage_started is not None:
            log.info(
                "outbox_send_recovered",
                outage_s=round(self._clock() - self._outage_started, 3),
                failed_sends=self._outage_failures,
                queued=self.queued,
                spooled=self.spooled,
            )
            self._outage_started = None
            self._outage_failures = 0
        self._dropping = False
        return True

    # -- the spool -------------------------------------------------------------------------

    def _recover_spool(self) -> None:
        """Pick up what a previous run left; remove what a crash left half-written."""
        ensure_writable_dir(self._spool_dir, f"spool directory {self._spool_dir}")
        found: list[_SpoolFile] = []
        for path in sorted(self._spool_dir.iterdir()):
            if path.is_dir():
                continue  # not ours to delete
            match = _SPOOL_NAME.fullmatch(path.name)
            if match is None:  # a `.tmp` from a crash mid-write, or a stranger
                self._remove_corrupt(path, problem="unexpected file name")
                continue
            try:
                size = path.stat().st_size
            except OSError as error:
                self._remove_corrupt(path, problem=str(error))
                continue
            found.append(_SpoolFile(int(match[1]), path, size))
        self._spool.extend(found)
        self._spool_bytes = sum(file.size for file in found)
        if found:
            self._next_seq = found[-1].seq + 1
            log.info("outbox_spool_recovered", messages=len(found), bytes=self._spool_bytes)
        # A previous run may have had a larger bound.
        while self._spool_bytes > self._max_spool_bytes and self._spool:
            self._drop_oldest_spooled()

    def _spill(self, entry: _Entry) -> None:
        """Move a message from memory to the spool, dropping the oldest spooled ones to fit."""
        data = _encode(entry.message)
        if len(data) > self._max_spool_bytes:
            self._drop("spool_full", output=entry.message.output, size=len(data))
            return
        # The file of the message in flight is not dropped: the bound may be overshot by it.
        while self._spool_bytes + len(data) > self._max_spool_bytes and self._spool:
            self._drop_oldest_spooled()
        path = self._spool_dir / f"{entry.seq:020d}.msg"
        temp = path.with_name(path.name + _TEMP_SUFFIX)
        try:
            # Temp file and rename, so a crash never leaves a partial `.msg`. No fsync: losing
            # the last seconds of telemetry on power loss is fine, an fsync per message is not.
            temp.write_bytes(data)
            os.replace(temp, path)
        except OSError as error:  # disk full or read-only: the spool is as full as it gets
            temp.unlink(missing_ok=True)
            self._drop("spool_full", output=entry.message.output, error=str(error))
            return
        self._insert_spooled(_SpoolFile(entry.seq, path, len(data)))

    def _insert_spooled(self, spooled: _SpoolFile) -> None:
        self._spool_bytes += spooled.size
        if not self._spool or spooled.seq > self._spool[-1].seq:
            self._spool.append(spooled)
            return
        # Only drain() spools an older message (the one that was in flight).
        position = next(i for i, other in enumerate(self._spool) if other.seq > spooled.seq)
        self._spool.insert(position, spooled)

    def _spool_the_rest(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            if current.spooled is not None:
                self._spool_bytes -= current.spooled.size  # counted again on insert
                self._insert_spooled(current.spooled)
            else:
                self._spill(_Entry(current.seq, current.message))
        while self._memory:
            self._spill(self._memory.popleft())
        log.info("outbox_drained", spooled=self.spooled)

    def _read_spooled(self, spooled: _SpoolFile) -> OutboundMessage | None:
        """The message in a spool file, or None if the file is unusable (removed, counted)."""
        try:
            data = spooled.path.read_bytes()
        except OSError as error:
            self._spool_bytes -= spooled.size
            self._remove_corrupt(spooled.path, problem=str(error))
            return None
        message = _decode(data)
        if message is None:
            self._spool_bytes -= spooled.size
            self._remove_corrupt(spooled.path, problem="unparseable")
            return None
        if len(message.body) > self._max_message_bytes:  # spooled under a larger limit
            self._remove_spooled(spooled)
            self._drop("too_large", output=message.output, size=len(message.body))
            return None
        return message

    def _drop_oldest_spooled(self) -> None:
        oldest = self._spool.popleft()
        self._remove_spooled(oldest)
        self._dropped.labels("spool_full").inc()
        if not self._dropping:  # once per outage, not once per message
            self._dropping = True
            log.warning("outbox_spool_full_dropping_oldest", max_spool_bytes=self._max_spool_bytes)

    def _remove_spooled(self, spooled: _SpoolFile) -> None:
        self._spool_bytes -= spooled.size
        try:
            spooled.path.unlink(missing_ok=True)
        except OSError as error:  # the message is accounted for; a stray file is harmless
            log.warning("outbox_spool_unlink_failed", path=str(spooled.path), error=str(error))

    def _remove_corrupt(self, path: Path, *, problem: str) -> None:
        self._dropped.labels("corrupt").inc()
        log.warning("outbox_spool_file_corrupt", path=str(path), problem=problem)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("outbox_spool_unlink_failed", path=str(path), error=str(error))

    def _drop(self, reason: DropReason, **fields: object) -> None:
        self._dropped.labels(reason).inc()
        log.warning("outbox_message_dropped", reason=reason, **fields)


def _output_label(output: str) -> str:
    return output if output in OUTPUT_LABELS else _OTHER_OUTPUT


def _encode(message: OutboundMessage) -> bytes:
    """Spool file: one JSON header line, then the body as sent (it holds no newline)."""
    header = {field: getattr(message, field) for field in _HEADER_FIELDS}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + message.body


def _decode(data: bytes) -> OutboundMessage | None:
    head, newline, body = data.partition(b"\n")
    if not newline:
        return None
    try:
        header = json.loads(head)
        json.loads(body)  # a truncated body is no use to the hub
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return None
    if not isinstance(header, dict):
        return None
    fields = [header.get(field) for field in _HEADER_FIELDS]
    if not all(isinstance(value, str) for value in fields):
        return None
    output, message_id, schema, created = (str(value) for value in fields)
    return OutboundMessage(output, body, message_id, schema, created)

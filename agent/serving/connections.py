"""Connection admission for the HTTP servers: the process never runs out of descriptors.

The open-file limit is read once at start (after raising the soft limit to the hard one) and
split into a budget (`fd_budget`): a reserve for everything that is not a connection (model and
state files, the hub link, downloads, the quarantine child's pipes, the event loop's own), the
metrics port's connections, the API port's connections, and a small health reserve.

`Listener` accepts on its listening socket itself rather than through `loop.create_server`, so
that a socket is counted from the moment it exists (a TLS handshake included) and an accept
error is ours to report: one structured, rate-limited `http_accept_failed` event and a counter,
never asyncio's traceback per attempt. Beyond the API cap a connection gets a slot of the health
reserve, where its first request line must ask for `/v2/health/live` or `/ready` (anything else
gets a 503 and is closed); beyond that too it is closed at once, with no answer and nothing
left lingering. Why a reserve rather than pausing the accepts: a paused socket leaves every new
client in the kernel's backlog behind the burst, health probes included, until a connection
closes (up to the keep-alive timeout); the reserve answers them within milliseconds. A reserve
slot still waiting for its request line is the first to go when the reserve is full, so a burst
of idle connections cannot hold it.

Each connection's first request line is checked (`refusals.check_request_line`) before aiohttp
sees it. A connection closed with unread bytes waiting (a 10 MB header) is closed lingering:
half-closed, the rest read and dropped for at most `LINGER_S`, so the client reads the answer
instead of a reset.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import resource
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter

from agent.serving.refusals import MAX_LINE, Refusal, check_request_line, encode_refusal

# Descriptors kept beyond all connections: at least this many, or an eighth of the limit.
# Measured: `python -m agent serve` with one model holds 11 at rest.
FD_RESERVE_MIN: Final = 48
MAX_CAP: Final = 4096
MAX_HEALTH_RESERVE: Final = 32
MAX_METRICS_CONNECTIONS: Final = 16
LINGER_S: Final = 1.0
# A health-reserve connection has this long to send its request line and be answered.
RESERVE_HOLD_S: Final = 2.0
# Accepts per readiness event: the loop serves requests in between, and the reserve covers
# the sockets a batch's evictions leave open until the loop's next pass.
ACCEPT_BATCH: Final = 16
ACCEPT_RETRY_S: Final = 0.05  # after an accept error (a full descriptor table)
ACCEPT_LOG_EVERY_S: Final = 10.0
# Pending connections wait in the kernel, holding none of our descriptors; a short queue
# overflows under a burst and a probe behind it waits for its SYN to be resent (1 s).
BACKLOG: Final = 1024


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else MAX_CAP + FD_RESERVE_MIN
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


@dataclass(frozen=True, slots=True)
class FdBudget:
    """How the open-file limit is shared; the parts add up to at most `limit`."""

    limit: int
    reserve: int  # everything that is not a connection
    api: int  # connections to the API port
    health: int  # more connections to the API port, for health requests only
    metrics: int  # connections to the metrics port


def fd_budget(open_file_limit: int, configured: int | None = None) -> FdBudget:
    """The budget for `open_file_limit`; `configured` (connections per port) only lowers it."""
    reserve = max(FD_RESERVE_MIN, open_file_limit // 8)
    room = max(open_file_limit - reserve, 3)
    share = max(room // 16, 1)
    health = min(share, MAX_HEALTH_RESERVE)
    metrics = min(share, MAX_METRICS_CONNECTIONS, configured or MAX_METRICS_CONNECTIONS)
    api = max(min(room - health - metrics, configured or MAX_CAP, MAX_CAP), 1)
    return FdBudget(open_file_limit, open_file_limit - room, api, health, metrics)


class Admission(enum.Enum):
    FULL = "full"  # any request
    HEALTH = "health"  # a slot of the health reserve: health requests only


class ConnectionGuard:
    """Counts the open connections (sockets) of one server and admits up to its budget."""

    def __init__(
        self,
        cap: int,
        health_reserve: int = 0,
        *,
        on_busy: Callable[[], None] = lambda: None,
        on_malformed: Callable[[], None] = lambda: None,
    ) -> None:
        self.cap = cap
        self.health_reserve = health_reserve
        self.open = 0
        self.in_reserve = 0
        self.refused = 0
        self.on_busy = on_busy
        self.on_malformed = on_malformed
        # Reserve slots still waiting for a request line, oldest first: the first to evict.
        self.waiting: OrderedDict[_Guarded, None] = OrderedDict()
        # Every connection not handed to aiohttp yet: aiohttp's shutdown does not know them.
        self.silent: set[_Guarded] = set()

    def admit(self) -> Admission | None:
        if self.open < self.cap:
            self.open += 1
            return Admission.FULL
        if self.in_reserve >= self.health_reserve:
            # The oldest that has not sent a byte yet; one whose request line is already in
            # the socket (a probe behind a burst) is kept.
            idle = next((c for c in self.waiting if not c.unread()), None)
            if idle is not None:
                idle.evict()  # its slot is free now; its socket closes on the next loop pass
        if self.in_reserve < self.health_reserve:
            self.in_reserve += 1
            return Admission.HEALTH
        self.refused += 1
        self.on_busy()
        return None

    def release(self, admission: Admission) -> None:
        if admission is Admission.FULL:
            self.open -= 1
        else:
            self.in_reserve -= 1


class _Slot:
    """One admitted connection's place in its guard, released exactly once."""

    def __init__(self, guard: ConnectionGuard, admission: Admission) -> None:
        self.guard = guard
        self.admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.guard.release(self.admission)


class _LingeringTransport(asyncio.Transport):
    """The transport aiohttp sees: its `close` lingers when unread bytes are waiting."""

    def __init__(self, real: asyncio.Transport, owner: _Guarded) -> None:
        super().__init__()
        self._real = real
        self._owner = owner

    def close(self) -> None:
        self._owner.close(linger=True)

    def abort(self) -> None:
        self._real.abort()

    def is_closing(self) -> bool:
        return self._real.is_closing() or self._owner.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._real.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._real.writelines(list_of_data)

    def write_eof(self) -> None:
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()


class _Guarded(asyncio.Protocol):
    """One connection: its first request line checked, then forwarded to aiohttp's protocol."""

    def __init__(
        self, slot: _Slot, factory: Callable[[], asyncio.Protocol], sock: socket.socket
    ) -> None:
        self._slot = slot
        self._factory = factory
        self._sock = sock
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self.closing = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def _guard(self) -> ConnectionGuard:
        return self._slot.guard

    def hold(self, idle_s: float) -> None:
        """Starts the wait for the first request line, from the accept (before the protocol
        runs: an eviction must see a reserve slot within the same accept batch). A full
        connection silent for `idle_s` is closed (aiohttp's own idle timeout starts only
        when it is handed the connection)."""
        loop = asyncio.get_running_loop()
        self._guard.silent.add(self)
        if self._slot.admission is Admission.HEALTH:
            self._guard.waiting[self] = None
            self._timer = loop.call_later(RESERVE_HOLD_S, self.evict)
        else:
            self._timer = loop.call_later(idle_s, self.close_now)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream server's
        self._transport = transport
        if self.closing:  # evicted before its transport existed
            transport.close()

    def _forget(self) -> None:
        self._guard.waiting.pop(self, None)
        self._guard.silent.discard(self)

    def evict(self) -> None:
        """Close a health-reserve connection now (held too long, or its slot is wanted)."""
        self._guard.on_busy()
        self._forget()
        self._slot.release()
        self.close_now()

    def abandon(self) -> None:
        """Its transport could not be made (a failed handshake, the server stopping)."""
        self._forget()
        if self._timer is not None:
            self._timer.cancel()
        self._slot.release()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering: read and dropped
        if self._inner is not None:
            self._inner.data_received(data)
            return
        self._head += data
        end = self._head.find(b"\n")
        if end > MAX_LINE or (end < 0 and len(self._head) > MAX_LINE):
            self._refuse(Refusal(414, f"request line over {MAX_LINE} bytes", True))
            return
        if end < 0:
            return
        line = self._head[:end].removesuffix(b"\r")
        refusal = check_request_line(line, health_only=self._slot.admission is Admission.HEALTH)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._forget()
        if self._timer is not None:
            self._timer.cancel()
        if self._slot.admission is Admission.HEALTH:
            # Answered within the hold, then closed: a reserve slot is not kept alive.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(RESERVE_HOLD_S, self.close_now)
        # (A full connection: aiohttp's keep-alive timeout takes over.)
        head, self._head = self._head, b""
        assert self._transport is not None  # set by connection_made
        self._inner = self._factory()
        self._inner.connection_made(_LingeringTransport(self._transport, self))
        self._inner.data_received(head)

    def _refuse(self, refusal: Refusal) -> None:
        self._forget()
        (self._guard.on_malformed if refusal.malformed else self._guard.on_busy)()
        if self._transport is not None:
            self._transport.write(encode_refusal(refusal))
        self.close(linger=True)

    def close(self, *, linger: bool) -> None:
        """Close; with `linger`, when unread bytes wait, half-close and drop what comes for at
        most `LINGER_S` first (closing over unread bytes sends a reset that destroys the
        answer before the client reads it)."""
        transport = self._transport
        if self.closing or transport is None:
            return
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if not (linger and self.unread()):
            transport.close()
            return
        if transport.can_write_eof():
            transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def close_now(self) -> None:
        self._forget()
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()  # the socket closes on the loop's next pass
        else:
            self._sock.close()  # not handed to a transport yet: its descriptor goes now

    def unread(self) -> bool:
        """Whether bytes from the client wait in the socket, unread."""
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self._timer is not None:
            self._timer.cancel()
        self._slot.release()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.closing or self._inner is None:
            return False  # the client is done: close now
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class AcceptErrors:
    """Accept errors of the servers: counted by a bounded `error` label and logged as one
    structured event at most every `ACCEPT_LOG_EVERY_S` per server (with how many it stands
    for), never a traceback per attempt."""

    KNOWN: Final = frozenset({"EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"})

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "agent",
        *,
        clock: Callable[[], float] = time.monotonic,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._counter = Counter(
            "http_accept_errors",
            "Connections the HTTP servers could not accept, by error",
            ["service", "error"],
            namespace=namespace,
            registry=registry,
        )
        self._clock = clock
        self._log = log or structlog.get_logger(__name__)
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, service: str, error: OSError) -> None:
        name = errno.errorcode.get(error.errno or 0, "")
        label = name if name in self.KNOWN else "other"
        self._counter.labels(service=service, error=label).inc()
        self._unlogged[service] = self._unlogged.get(service, 0) + 1
        now = self._clock()
        last = self._last_logged.get(service)
        if last is not None and now - last < ACCEPT_LOG_EVERY_S:
            return
        self._last_logged[service] = now
        self._log.error(
            "http_accept_failed",
            service=service,
            error=label,
            detail=error.strerror,
            count=self._unlogged.pop(service),
        )


class Listener:
    """Accepts connections on `sock` for `factory` (aiohttp's protocol) within `guard`."""

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        guard: ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None,
        idle_s: float,
        accept_errors: AcceptErrors,
    ) -> None:
        self.name = name
        self.sock = sock
        self._factory = factory
        self.guard = guard
        self._ssl = ssl_context
        self._idle_s = idle_s
        self._accept_errors = accept_errors
        self._connecting: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)

    def start(self) -> None:
        self._retry = None
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                self._accept_errors.record(self.name, error)
                # Out of descriptors: wait for some to close rather than spin on the socket.
                self._loop.remove_reader(self.sock.fileno())
                self._retry = self._loop.call_later(ACCEPT_RETRY_S, self.start)
                return
            admission = self.guard.admit()
            if admission is None:
                conn.close()  # beyond the budget: dropped at once, nothing lingers
                continue
            conn.setblocking(False)
            guarded = _Guarded(_Slot(self.guard, admission), self._factory, conn)
            guarded.hold(self._idle_s)
            task = self._loop.create_task(self._connect(conn, guarded))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, guarded: _Guarded) -> None:
        if guarded.closing:  # evicted before it got here
            guarded.abandon()
            return
        try:
            await self._loop.connect_accepted_socket(
                lambda: guarded,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self._idle_s if self._ssl else None,
            )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
            # A failed or timed-out handshake, or the server stopping: the socket is closed.
            conn.close()
            guarded.abandon()

    async def close(self) -> None:
        """Stop accepting and close the socket; handshakes under way are cancelled."""
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self._connecting):
            task.cancel()
        for silent in list(self.guard.silent):
            silent.close_now()
        if self._connecting:
            await asyncio.wait(list(self._connecting))

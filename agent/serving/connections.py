"""Connection discipline for the HTTP servers: a cap below the open-file limit, counted refusals.

Idle connections are closed by aiohttp's keep-alive timeout, which runs from a connection's
start (a client that never completes its request headers is closed by it too); a body read
has its own deadline in the handler. What aiohttp cannot do is bound how many connections are
open: past the process's open-file limit, `accept` fails with EMFILE, normal requests time out
and asyncio logs every failed accept. `ConnectionGuard` wraps the server's protocol factory:
beyond `cap` open connections a new one gets a fixed `503` and is closed at once, so the
process keeps file descriptors for its model files, its state and the requests it serves.

Requests aiohttp refuses while parsing (a malformed request line, an odd method, oversized
headers) never reach the application or its middleware: `RefusalLogger` is the logger aiohttp
reports them to, and counts them instead of logging a traceback per bad request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any, Final

from aiohttp.http_exceptions import HttpProcessingError

# Descriptors kept beyond the connection cap: model and state files, the metrics port's
# connections, the quarantine child's pipes, logs, the event loop's own.
FD_RESERVE: Final = 64
MAX_CAP: Final = 4096
REFUSED_LINGER_S: Final = 0.5
_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 41\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error":"too many connections; retry"}\r\n'
)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else MAX_CAP + FD_RESERVE
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def connection_cap(open_file_limit: int, configured: int | None) -> int:
    """How many connections may be open at once: the setting, but never so many that the
    process runs out of file descriptors (`FD_RESERVE` kept); at least 1."""
    ceiling = max(open_file_limit - FD_RESERVE, 1)
    wanted = configured if configured is not None else MAX_CAP
    return max(min(wanted, ceiling), 1)


class ConnectionGuard:
    """Counts open connections of one server and refuses those beyond `cap`."""

    def __init__(self, cap: int, on_refused: Callable[[], None]) -> None:
        self.cap = cap
        self.open = 0
        self.refused = 0
        self._on_refused = on_refused

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server` around aiohttp's (`runner.server`)."""
        return lambda: _Guarded(self, factory)

    def admit(self) -> bool:
        if self.open >= self.cap:
            self.refused += 1
            self._on_refused()
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's protocol, created only for an admitted connection."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit():
            # Answered and half-closed at once; closed fully a moment later, so that the
            # client's request, arriving meanwhile and discarded, does not turn into a reset
            # that would destroy the answer before the client reads it.
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_REFUSAL)
                if transport.can_write_eof():
                    transport.write_eof()
            asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._guard.release()
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        # A refused connection closes as soon as its client has (False: close now).
        return self._inner.eof_received() if self._inner is not None else False

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class RefusalLogger(logging.Logger):
    """aiohttp's server logger: a request it refused while parsing is counted, not logged.

    aiohttp reports each refusal as "Error handling request" with the exception; anything
    else (a handler's crash, a 500) still goes to the real logger.
    """

    def __init__(self, delegate: logging.Logger, on_refused: Callable[[], None]) -> None:
        super().__init__(delegate.name)
        self._delegate = delegate
        self._on_refused = on_refused

    def _refused(self, msg: object, kwargs: dict[str, Any]) -> bool:
        error = kwargs.get("exc_info")
        if msg == "Error handling request from %s" and isinstance(error, HttpProcessingError):
            self._on_refused()
            return True
        return False

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not self._refused(msg, kwargs):
            self._delegate.exception(msg, *args, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not self._refused(msg, kwargs):
            self._delegate.debug(msg, *args, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._delegate.error(msg, *args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._delegate.warning(msg, *args, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._delegate.info(msg, *args, **kwargs)

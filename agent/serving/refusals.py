"""Requests refused before the application sees them, answered at once with the status that
says why.

Every connection's first request line is checked before aiohttp sees it (`check_request_line`):
aiohttp's parser waits for headers after an HTTP/0.9 line (`GET /` and no version) until the
idle timeout, and answers an `HTTP/2.0` request line as if it were HTTP/1.1.

Requests aiohttp refuses while parsing (a malformed request line, an odd method, oversized
headers) never reach the application or its middleware: `RefusalLogger` is the logger aiohttp
reports them to, and counts them instead of logging a traceback per bad request;
`RefusingHandler` answers them with a JSON body and the status that says what was wrong (431
for oversized headers).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

MAX_LINE: Final = 8190  # aiohttp's own request line limit: a longer one gets 414 from here


HEALTH_PATHS: Final = frozenset({b"/v2/health/live", b"/v2/health/ready"})


_VERSION: Final = re.compile(rb"HTTP/\d\.\d")


_PHRASES: Final = {
    400: "Bad Request",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    malformed: bool  # else refused for want of room


def _target_path(target: bytes) -> bytes:
    if target.startswith((b"http://", b"https://")):  # absolute form
        target = b"/" + target.split(b"/", 3)[-1] if target.count(b"/") >= 3 else b"/"
    return target.split(b"?", 1)[0]


def check_request_line(line: bytes, *, health_only: bool) -> Refusal | None:
    """The refusal for a connection's first request line (without its CRLF), or None."""
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        return Refusal(400, "malformed request line: expected METHOD TARGET HTTP/1.1", True)
    method, target, version = parts
    if not _VERSION.fullmatch(version):
        return Refusal(400, "malformed HTTP version in the request line", True)
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return Refusal(505, "HTTP version not supported: use HTTP/1.1", True)
    if health_only and (
        method not in (b"GET", b"HEAD") or _target_path(target) not in HEALTH_PATHS
    ):
        return Refusal(503, "too many connections; retry", False)
    return None


def encode_refusal(refusal: Refusal) -> bytes:
    """A complete HTTP/1.1 answer with the v2 error body; the connection closes after it."""
    body = json.dumps({"error": refusal.message}).encode()
    head = (
        f"HTTP/1.1 {refusal.status} {_PHRASES.get(refusal.status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class RefusingHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses with a JSON body and a
    precise status: 431 for header lines over the limit or too many of them."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400 and isinstance(exc, HttpProcessingError):
            response = super().handle_error(request, status, exc, message)  # logs, counts
            status = 431 if _headers_too_large(exc) else 400
            text = "request header fields too large" if status == 431 else exc.message
            refused = web.Response(
                status=status,
                body=json.dumps({"error": text[:200]}).encode(),
                content_type="application/json",
            )
            refused.force_close()
            del response
            return refused
        return super().handle_error(request, status, exc, message)


def _headers_too_large(exc: HttpProcessingError) -> bool:
    # The request line's length is checked before aiohttp parses (414); a LineTooLong here
    # is a header field.
    return isinstance(exc, LineTooLong) or "Too many headers" in str(exc.message)


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

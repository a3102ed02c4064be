"""The HTTP API: Open Inference Protocol v2 REST on one port, Prometheus `/metrics` on another.

`HttpService` serves the KServe / Triton v2 endpoints for the models in a live mapping (the
app may add or swap entries; each request looks its model up once). Every 4xx/5xx carries the
v2 error body `{"error": "..."}`, routing errors included. Requests refused before they reach
a model count in `metrics.reject(reason)` with a bounded reason; what happens inside `infer`
(validation, not ready, failures, latency) the inference service records itself.

The infer handler is the hot path (benchmarked against KServe): no validation library, no
access log, one `json.loads` and one `json.dumps`, and tensors built by numpy in one call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import Field

from agent import __version__
from agent.config import Section
from agent.observation.metrics import InferenceMetrics
from agent.serving import protocol
from agent.serving.auth import Credentials, auth_middleware
from agent.serving.connections import (
    BACKLOG,
    AcceptErrors,
    ConnectionGuard,
    Listener,
    fd_budget,
    raise_open_file_limit,
)
from agent.serving.contract import RequestError
from agent.serving.refusals import MAX_LINE, RefusalLogger, RefusingHandler
from agent.serving.v2 import InferenceError, ServedModel, infer_v2
from wire.reasons import Reason

SERVER_NAME: Final = "edge-mlops-agent"
LINGERING_S: Final = 1.0


class HttpSettings(Section):
    """Where the v2 API and /metrics listen, and how big a request body may be."""

    host: str = "0.0.0.0"  # noqa: S104 - a container's port must be reachable from outside it
    http_port: int = Field(8000, ge=0, le=65535)
    metrics_port: int = Field(9600, ge=0, le=65535)
    max_request_bytes: int = Field(64 << 20, ge=1024)
    # An idle connection, or one that has not completed its request headers, is closed after
    # this long (aiohttp's own default is an hour).
    keepalive_timeout_s: float = Field(15.0, gt=0.0, le=3600.0)
    # A request body must have arrived this long after its headers, else 408 and close.
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    # Open connections per port; beyond, health only or dropped. Unset: as many as the
    # open-file limit allows (raised to its hard limit at start) minus a reserve.
    max_connections: int | None = Field(None, ge=1)


class HttpReason(enum.StrEnum):
    """Refusals only HTTP routing makes (the rest are `wire.reasons.Reason`)."""

    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MALFORMED = "malformed_http"  # refused by aiohttp's parser, before routing
    BODY_TIMEOUT = "body_timeout"  # 408: the body did not arrive in time
    TOO_MANY_CONNECTIONS = "too_many_connections"  # beyond the cap: dropped, or 503
    UNAUTHORIZED = "unauthorized"  # 401: no valid bearer token or client certificate


_STATUS: Final[Mapping[Reason, int]] = {
    Reason.UNKNOWN_MODEL: 404,
    Reason.TOO_LARGE: 413,
    Reason.NOT_READY: 503,
    # The request is well formed but the model has no finite answer for it: see
    # `inference._refuse_non_finite` for why this is not a 500.
    Reason.NON_FINITE_OUTPUT: 422,
}
# aiohttp's own refusals (routing, body size) -> bounded reject reasons.
_HTTP_REASONS: Final[Mapping[int, HttpReason | Reason]] = {
    404: HttpReason.NOT_FOUND,
    405: HttpReason.METHOD_NOT_ALLOWED,
    413: Reason.TOO_LARGE,
}
_JSON: Final = "application/json"
# Methods no endpoint serves, whatever the target (CONNECT's is not even a path): 405, not 404.
_NEVER_ALLOWED: Final = frozenset({"CONNECT", "TRACE"})
_ALLOWED: Final = "GET, HEAD, POST"


def refuse_foreign_methods(on_refused: Callable[[enum.StrEnum], None]) -> Middleware:
    """405 with `Allow` for CONNECT and TRACE, before authentication and routing; an HTTP
    version other than 1.0 or 1.1 on a kept-alive connection gets 505 (the first request of a
    connection is checked before aiohttp parses it)."""

    @web.middleware
    async def refuse(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.version not in ((1, 0), (1, 1)):
            on_refused(HttpReason.MALFORMED)
            response = _error(505, "HTTP version not supported: use HTTP/1.1")
            response.force_close()
            return response
        if request.method in _NEVER_ALLOWED:
            on_refused(HttpReason.METHOD_NOT_ALLOWED)
            return web.Response(
                status=405,
                body=protocol.encode_error(f"method {request.method} is not allowed"),
                content_type=_JSON,
                headers={"Allow": _ALLOWED},
            )
        return await handler(request)

    return refuse


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=protocol.encode_error(message), content_type=_JSON)


def _request_error(error: RequestError) -> web.Response:
    return _error(_STATUS.get(error.reason, 400), error.message)


def _ok(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=_JSON)


class _V2Handlers:
    """The v2 endpoints over a live model mapping; refusals raise `RequestError`."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        metrics: InferenceMetrics,
        *,
        max_body_bytes: int,
        max_input_bytes: int,
        body_timeout_s: float,
        server_name: str,
        server_version: str,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._models = models
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s
        self._max_input_bytes = max_input_bytes
        self._log = log
        self._server_metadata = protocol.encode_server_metadata(
            name=server_name, version=server_version
        )

    @web.middleware
    async def v2_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Turn every refusal, aiohttp's routing errors included, into a counted v2 error."""
        try:
            return await handler(request)
        except RequestError as error:
            self._metrics.reject(error.reason)
            return _request_error(error)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = _HTTP_REASONS.get(exc.status, Reason.BAD_REQUEST)
            self._metrics.reject(reason)
            response = _error(exc.status, _describe(request, exc, reason))
            if "Allow" in exc.headers:  # a 405 says what is allowed (RFC 9110)
                response.headers["Allow"] = exc.headers["Allow"]
            return response

    # -- health and metadata -------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        # Liveness only says the loop answers; a model still loading is alive but not ready.
        return _ok(b'{"live":true}')

    async def ready(self, request: web.Request) -> web.Response:
        models = list(self._models.values())
        if not models:
            return _error(503, "no model is loaded yet")
        waiting = sorted(m.name for m in models if not m.ready)
        if waiting:
            return _error(503, f"not ready: {', '.join(waiting)}")
        return _ok(b'{"ready":true}')

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _ok(self._server_metadata)

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, _ = self._model(request)
        meta = model.metadata()
        return _ok(
            protocol.encode_model_metadata(
                name=meta.name,
                versions=[str(v) for v in meta.versions],
                platform=meta.platform,
                contract=meta.contract,
                parameters=meta.parameters,
            )
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        model, _ = self._model(request)
        if not model.ready:
            return _error(503, f"model {model.name!r} is not ready")
        return _ok(protocol.encode_model_ready(model.name))

    # -- inference -----------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        model, _ = self._model(request)  # a version in the path is checked there
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            # Refuse on the declared length, before reading a byte of the body.
            raise RequestError(
                Reason.TOO_LARGE,
                f"request body of {length} bytes; the limit is {self._max_body_bytes}",
            )
        try:
            async with asyncio.timeout(self._body_timeout_s):
                body = await request.read()
        except TimeoutError:
            # A body trickling in (slow loris) holds a connection and a buffer: cut it.
            self._metrics.reject(HttpReason.BODY_TIMEOUT)
            response = _error(408, f"request body not received within {self._body_timeout_s} s")
            response.force_close()
            return response
        header_length = protocol.parse_header_length(request.headers.get(protocol.HEADER_LENGTH))
        try:
            encoded = await infer_v2(
                self._models,
                model.name,
                body,
                metrics=self._metrics,
                max_input_bytes=self._max_input_bytes,
                header_length=header_length,
            )
        except RequestError as error:  # accounted for by `infer_v2`: not through the middleware
            return _request_error(error)
        except InferenceError as error:
            return _error(500, error.message)
        if encoded.header_length is None:
            return web.Response(body=encoded.body, content_type=_JSON)
        return web.Response(
            body=encoded.body,
            content_type=encoded.content_type,
            headers={protocol.HEADER_LENGTH: str(encoded.header_length)},
        )

    def _model(self, request: web.Request) -> tuple[ServedModel, str | None]:
        """The model and version a `/v2/models/{name}[/versions/{version}]` path names."""
        match = request.match_info
        name = match["name"]
        model = self._models.get(name)
        if model is None:
            raise RequestError(Reason.UNKNOWN_MODEL, f"unknown model {name[:200]!r}")
        version = match.get("version")
        if version is not None and version not in {str(v) for v in model.metadata().versions}:
            raise RequestError(
                Reason.UNKNOWN_MODEL, f"model {name!r} has no version {version[:200]!r} loaded"
            )
        return model, version


def _describe(request: web.Request, exc: web.HTTPException, reason: HttpReason | Reason) -> str:
    path = request.path[:200]
    if reason is HttpReason.NOT_FOUND:
        return f"no such endpoint: {path}"
    if reason is HttpReason.METHOD_NOT_ALLOWED:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ())))
        return f"method {request.method} is not allowed on {path}; allowed: {allowed}"
    if reason is Reason.TOO_LARGE:
        return f"request body over the limit of {request.client_max_size} bytes"
    return exc.text or exc.reason


def create_app(
    models: Mapping[str, ServedModel],
    metrics: InferenceMetrics,
    *,
    max_body_bytes: int,
    max_input_bytes: int | None = None,
    body_timeout_s: float = HttpSettings.model_fields["body_timeout_s"].default,
    server_name: str = SERVER_NAME,
    server_version: str = __version__,
    log: structlog.typing.FilteringBoundLogger | None = None,
    outer: Sequence[Middleware] = (),
) -> web.Application:
    """The v2 application, `outer` middlewares first (authentication). `max_input_bytes`
    bounds decoded tensors (default: 2 x the body cap, as JSON integers can take fewer bytes
    on the wire than in memory)."""
    metrics.declare(HttpReason)
    handlers = _V2Handlers(
        models,
        metrics,
        max_body_bytes=max_body_bytes,
        max_input_bytes=2 * max_body_bytes if max_input_bytes is None else max_input_bytes,
        body_timeout_s=body_timeout_s,
        server_name=server_name,
        server_version=server_version,
        log=log or structlog.get_logger(__name__),
    )
    # aiohttp refuses bodies over client_max_size on read, with a 413 the middleware rewrites.
    app = web.Application(
        middlewares=[refuse_foreign_methods(metrics.reject), *outer, handlers.v2_errors],
        client_max_size=max_body_bytes,
    )
    router = app.router
    router.add_get("/v2/health/live", handlers.live)
    router.add_get("/v2/health/ready", handlers.ready)
    router.add_get("/v2", handlers.server_metadata)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_get(base, handlers.model_metadata)
        router.add_get(base + "/ready", handlers.model_ready)
        router.add_post(base + "/infer", handlers.infer)
    return app


_REGISTRY: Final = web.AppKey("registry", CollectorRegistry)


async def _metrics_handler(request: web.Request) -> web.Response:
    registry: CollectorRegistry = request.app[_REGISTRY]
    # Prometheus asks for OpenMetrics in Accept; anything else gets the text format.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


def create_metrics_app(
    registry: CollectorRegistry, outer: Sequence[Middleware] = ()
) -> web.Application:
    """Prometheus exposition of `registry` at `/metrics`."""
    app = web.Application(middlewares=[refuse_foreign_methods(lambda reason: None), *outer])
    app[_REGISTRY] = registry
    app.router.add_get("/metrics", _metrics_handler)
    return app


class _AppServer:
    """Runs one aiohttp application on host:port with the agent's start -> run -> stop shape:
    idle connections time out, open ones are kept within the descriptor budget
    (`connections`), refusals are counted."""

    def __init__(
        self,
        name: str,
        app: web.Application,
        port: int,
        settings: HttpSettings,
        *,
        log: structlog.typing.FilteringBoundLogger | None,
        on_refused: Callable[[enum.StrEnum], None] = lambda reason: None,
        credentials: Credentials | None = None,
        health_reserve: bool = False,
        accept_errors: AcceptErrors | None = None,
    ) -> None:
        self.name = name
        self.app = app
        self._host = settings.host
        self._port = port
        self._settings = settings
        self._on_refused = on_refused
        self._credentials = credentials
        self._health_reserve = health_reserve
        self._accept_errors = accept_errors or AcceptErrors()
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self._log = log or structlog.get_logger(__name__)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0); valid after `start`."""
        if self._listener is None:
            raise RuntimeError(f"{self.name} is not started")
        port: int = self._listener.sock.getsockname()[1]
        return port

    async def start(self) -> None:
        budget = fd_budget(raise_open_file_limit(), self._settings.max_connections)
        cap, reserve = (budget.api, budget.health) if self._health_reserve else (budget.metrics, 0)
        guard = ConnectionGuard(
            cap,
            reserve,
            on_busy=lambda: self._on_refused(HttpReason.TOO_MANY_CONNECTIONS),
            on_malformed=lambda: self._on_refused(HttpReason.MALFORMED),
        )
        handler_options: dict[str, object] = {
            # No access log: a logging call per request costs more than the tiny model.
            "access_log": None,
            "keepalive_timeout": self._settings.keepalive_timeout_s,
            # After a refusal, the unread rest of a body is drained for at most this long (so
            # the client reads the answer rather than a reset), not aiohttp's 10 s.
            "lingering_time": LINGERING_S,
            "logger": RefusalLogger(logging.getLogger("aiohttp.server"), guard.on_malformed),
            "max_line_size": MAX_LINE,
        }
        runner = web.AppRunner(self.app, **handler_options)  # type: ignore[arg-type]
        await runner.setup()
        server = runner.server
        if server is None:
            raise RuntimeError("aiohttp runner has no server after setup")
        loop = asyncio.get_running_loop()
        try:
            # Our own accept loop over aiohttp's protocol (see `connections`), not a TCPSite.
            sock = await self._bind(loop)
            self._listener = Listener(
                self.name,
                sock,
                lambda: RefusingHandler(server, loop=loop, **handler_options),  # type: ignore[arg-type]
                guard,
                ssl_context=self._credentials.ssl_context if self._credentials else None,
                # A TLS handshake, or a first request line, within the idle timeout.
                idle_s=self._settings.keepalive_timeout_s,
                accept_errors=self._accept_errors,
            )
            self._listener.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._log.info(
            "http_listening",
            service=self.name,
            host=self._host,
            port=self.port,
            max_connections=cap,
            health_reserve=reserve,
            open_file_limit=budget.limit,
        )

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        [(family, _, _, _, address), *_] = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        return socket.create_server(address, family=family, backlog=BACKLOG)

    async def run(self) -> None:
        """Requests are served by callbacks (`SecretsReloader` re-reads the secrets)."""

    async def stop(self, grace_s: float) -> None:
        """Close the listening socket and idle connections, let requests in flight finish within
        `grace_s`, then cancel the ones still running and close their connections."""
        runner, self._runner = self._runner, None
        listener, self._listener = self._listener, None
        if runner is None or listener is None:
            return
        await listener.close()
        # aiohttp reads its drain timeout from the runner, set at construction; the grace is
        # only known now. (BaseSite sets this same attribute for its deprecated argument.)
        runner._shutdown_timeout = grace_s
        await runner.cleanup()
        self._log.info("http_stopped", service=self.name)


class HttpService(_AppServer):
    """Open Inference Protocol v2 REST for the models in `models` (a live mapping)."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        metrics: InferenceMetrics,
        settings: HttpSettings,
        *,
        max_input_bytes: int | None = None,
        server_version: str = __version__,
        log: structlog.typing.FilteringBoundLogger | None = None,
        credentials: Credentials | None = None,
        accept_errors: AcceptErrors | None = None,
    ) -> None:
        outer = (
            [auth_middleware(credentials, lambda: metrics.reject(HttpReason.UNAUTHORIZED))]
            if credentials is not None and credentials.settings.authenticates
            else []
        )
        app = create_app(
            models,
            metrics,
            max_body_bytes=settings.max_request_bytes,
            max_input_bytes=max_input_bytes,
            body_timeout_s=settings.body_timeout_s,
            server_version=server_version,
            log=log,
            outer=outer,
        )
        super().__init__(
            "http",
            app,
            settings.http_port,
            settings,
            log=log,
            on_refused=metrics.reject,
            credentials=credentials,
            health_reserve=True,
            accept_errors=accept_errors,
        )


class MetricsService(_AppServer):
    """Prometheus exposition of `registry` at `/metrics`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        settings: HttpSettings,
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
        credentials: Credentials | None = None,
        accept_errors: AcceptErrors | None = None,
    ) -> None:
        outer = (
            [auth_middleware(credentials, lambda: None)]
            if credentials is not None and credentials.settings.authenticates
            else []
        )
        app = create_metrics_app(registry, outer)
        super().__init__(
            "metrics",
            app,
            settings.metrics_port,
            settings,
            log=log,
            credentials=credentials,
            accept_errors=accept_errors,
        )

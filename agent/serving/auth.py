"""Who may call the HTTP API: TLS, and a bearer token or a client certificate.

Off by default: in an IoT Edge deployment the agent publishes no host port and other modules
reach it over the IoT Edge network. When the API is exposed beyond that, it serves TLS
(`tls_cert_file` + `tls_key_file`) and requires, on every endpoint but health, either a bearer
token listed in `api_token_file` (one per line) or a client certificate signed by
`tls_client_ca_file`. A refused call gets 401 and is counted.

Secrets live in files (mounted secrets) and are re-read when they change, every
`secrets_reload_s`: a rotated token or certificate takes effect without a restart. New TLS
handshakes use the new certificate; connections already open keep theirs. A client CA file is
re-read too, but OpenSSL only adds to its trust store: removing a CA needs a restart.

The token file fails closed: emptied (or only comments) it lists no token, so none is valid;
missing, unreadable or malformed, no token is valid either and the secrets are reported failed
(`secrets_reload_failed`, `agent_secrets_failed` 1) until the file is usable again.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Gauge
from pydantic import Field, model_validator

from agent.config import Section
from agent.observation.metrics import LoopFailures
from agent.serving import protocol
from agent.ticks import ticks

log = structlog.get_logger(__name__)

# Liveness and readiness stay open: the IoT Edge runtime and load balancers probe them.
OPEN_PATHS: Final = frozenset({"/v2/health/live", "/v2/health/ready"})
MAX_TOKENS: Final = 64
MIN_TOKEN_CHARS: Final = 16


class AuthSettings(Section):
    tls_cert_file: Path | None = Field(None, description="Server certificate chain (PEM).")
    tls_key_file: Path | None = Field(None, description="Its private key (PEM).")
    tls_client_ca_file: Path | None = Field(None, description="CA of accepted client certs.")
    api_token_file: Path | None = Field(None, description="Bearer tokens, one per line.")
    secrets_reload_s: float = Field(5.0, gt=0.0, le=3600.0)

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("EDGEML_TLS_CERT_FILE and EDGEML_TLS_KEY_FILE go together")
        if self.tls_cert_file is None and self.authenticates:
            # A token over plain HTTP can be read off the network; a client certificate
            # needs TLS to be presented at all.
            raise ValueError(
                "EDGEML_API_TOKEN_FILE and EDGEML_TLS_CLIENT_CA_FILE need EDGEML_TLS_CERT_FILE"
            )
        return self

    @property
    def authenticates(self) -> bool:
        return self.api_token_file is not None or self.tls_client_ca_file is not None


class SecretError(ValueError):
    """A secret file that cannot be used (missing, empty, malformed)."""


def parse_tokens(text: str) -> frozenset[str]:
    """Tokens from a token file: one per line; blank lines and `#` comments skipped. None at
    all is valid: that is how every token is revoked at once."""
    tokens = frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    if len(tokens) > MAX_TOKENS:
        raise SecretError(f"the token file holds over {MAX_TOKENS} tokens")
    short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS or not t.isprintable()]
    if short:
        raise SecretError(f"tokens must be {MIN_TOKEN_CHARS}+ printable characters")
    return tokens


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def token_matches(presented: str, tokens: frozenset[str]) -> bool:
    # Every token compared in constant time: neither which one nor how much matched leaks.
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented.encode(), token.encode())
    return found


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What tells a file changed: replaced (inode), rewritten (mtime, size)."""

    inode: int
    mtime_ns: int
    size: int


def _stamp(path: Path) -> _Stamp | None:
    """The file's stamp; None while it cannot be stat'ed (missing), itself a state to notice."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _Stamp(stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _file_error(error: OSError) -> SecretError:
    return SecretError(f"secret file {error.filename}: {error.strerror}")


class Credentials:
    """The server's TLS context and the accepted tokens, re-read from their files on change.

    The token file fails closed: when it cannot be used, no token is valid. The TLS files keep
    their last good version instead: a certificate grants no access (the token and the client
    CA do), and dropping it would take the whole API down, health probes included, for a
    rotation that replaced the files non-atomically. Either failure is reported.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "agent",
    ) -> None:
        self.settings = settings
        self.tokens: frozenset[str] = frozenset()
        self.ssl_context: ssl.SSLContext | None = None
        self.failed: dict[Path, str] = {}  # file -> why it is unusable now
        self._stamps: dict[Path, _Stamp | None] = {}
        self._failed_gauge = Gauge(
            "secrets_failed",
            "1 while a secret file is missing or unusable (tokens then fail closed), else 0",
            namespace=namespace,
            registry=registry,
        )
        self.load()

    def _files(self) -> list[Path]:
        s = self.settings
        files = [s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file, s.api_token_file]
        return [f for f in files if f is not None]

    def _tls_files(self) -> list[Path]:
        return [f for f in self._files() if f != self.settings.api_token_file]

    def load(self) -> None:
        """Read every secret file now (at start); raises `SecretError` if one is unusable."""
        stamps = {path: _stamp(path) for path in self._files()}
        self._load_tls()
        self._load_tokens()
        self._stamps = stamps

    def _load_tokens(self) -> None:
        path = self.settings.api_token_file
        if path is None:
            return
        try:
            text = path.read_text()
        except OSError as error:
            raise _file_error(error) from error
        except UnicodeDecodeError as error:
            raise SecretError(f"secret file {path}: not text") from error
        self.tokens = parse_tokens(text)

    def _load_tls(self) -> None:
        s = self.settings
        if s.tls_cert_file is None or s.tls_key_file is None:
            return
        context = self.ssl_context or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(s.tls_cert_file, s.tls_key_file)
            if s.tls_client_ca_file is not None:
                context.load_verify_locations(cafile=str(s.tls_client_ca_file))
                # Optional: a client may present a certificate or a token instead.
                context.verify_mode = ssl.CERT_OPTIONAL
        except ssl.SSLError as error:
            raise SecretError(f"TLS files unusable: {error.reason or error}") from error
        except OSError as error:
            raise _file_error(error) from error
        self.ssl_context = context

    def reload_if_changed(self) -> bool:
        """Re-read the secret files that changed (a missing file is a change); True if they
        all loaded. A token file that fails revokes every token; TLS files that fail keep the
        last good certificate."""
        stamps = {path: _stamp(path) for path in self._files()}
        changed = {path for path, stamp in stamps.items() if self._stamps.get(path) != stamp}
        if not changed:
            return False
        self._stamps = stamps
        token_file = self.settings.api_token_file
        if token_file is not None and token_file in changed:
            self._reload(token_file, self._load_tokens, fail_closed=True)
        tls_changed = changed & set(self._tls_files())
        if tls_changed:
            self._reload(min(tls_changed), self._load_tls, fail_closed=False)
        self._failed_gauge.set(1 if self.failed else 0)
        if self.failed:
            return False
        log.info("secrets_reloaded", tokens=len(self.tokens))
        return True

    def _reload(self, key: Path, load: Callable[[], None], *, fail_closed: bool) -> None:
        try:
            load()
        except SecretError as error:
            self.failed[key] = str(error)
            if fail_closed:
                self.tokens = frozenset()
            log.error(  # noqa: TRY400 -- an expected state, reported without a traceback
                "secrets_reload_failed",
                file=str(key),
                error=str(error),
                consequence="no token is valid" if fail_closed else "last good certificate kept",
            )
            return
        self.failed.pop(key, None)
        if not fail_closed:  # a TLS reload covers every TLS file
            for path in self._tls_files():
                self.failed.pop(path, None)

    def authenticated(self, request: web.Request) -> bool:
        if self.settings.tls_client_ca_file is not None:
            ssl_object = (
                request.transport.get_extra_info("ssl_object") if request.transport else None
            )
            # Verified by OpenSSL during the handshake: a certificate here is a valid one.
            if ssl_object is not None and ssl_object.getpeercert():
                return True
        presented = bearer_token(request.headers.get("Authorization"))
        return presented is not None and token_matches(presented, self.tokens)


class SecretsReloader:
    """Service: re-reads the secret files on change, once for every server that uses them."""

    def __init__(self, credentials: Credentials, failures: LoopFailures | None = None) -> None:
        self.name = "secrets"
        self._credentials = credentials
        self._failures = failures or LoopFailures()

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        async for _ in ticks(self._credentials.settings.secrets_reload_s):
            try:
                self._credentials.reload_if_changed()
            except Exception:  # the files in use stay in use; the next tick tries again
                self._failures.record("secrets_reload")

    async def stop(self, grace_s: float) -> None:
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def auth_middleware(credentials: Credentials, on_refused: Callable[[], None]) -> Middleware:
    """401 for a call without a valid token or client certificate (health stays open)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or credentials.authenticated(request):
            return await handler(request)
        on_refused()
        return web.Response(
            status=401,
            body=protocol.encode_error(
                "authentication required: a bearer token or a client certificate"
            ),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="edge-mlops-agent"'},
        )

    return authenticate

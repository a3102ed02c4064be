"""Test fixtures for verified model delivery: a fault-injecting HTTPS artifact server on loopback,
a test CA with good, self-signed and expired server certificates, and a full-disk file opener.

Registered from ``tests/agent/conftest.py``; the fixtures live here so that other suites can
add their own fixtures to that conftest without touching these.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.releases.store import WritableFile

# --- a disk that fills up ------------------------------------------------------------------


class _BudgetFile:
    """A real file that raises ENOSPC once its opener's byte budget is spent."""

    def __init__(self, inner: WritableFile, owner: FullDisk) -> None:
        self._inner = inner
        self._owner = owner

    def write(self, data: bytes, /) -> int:
        room = self._owner.budget - self._owner.written
        if len(data) > room:
            # Like a real full disk: what fits is written, then the write fails.
            if room > 0:
                self._inner.write(data[:room])
                self._owner.written += room
            raise OSError(errno.ENOSPC, "No space left on device")
        self._owner.written += len(data)
        return self._inner.write(data)

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def close(self) -> None:
        self._inner.close()


@dataclass
class FullDisk:
    """An ``Opener`` for :class:`agent.releases.store.ModelStore`: files share ``budget`` bytes."""

    budget: int
    written: int = 0
    opened: list[str] = field(default_factory=list)

    def __call__(self, path: Path, mode: Literal["wb", "ab"]) -> WritableFile:
        self.opened.append(path.name)
        return _BudgetFile(path.open(mode), self)


# --- a fake sleep --------------------------------------------------------------------------


@dataclass
class RecordingSleep:
    """Back-off sleeps that return at once and are remembered, so retries cost no wall time."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


# --- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class TestPki:
    """A test CA and server certificates for 127.0.0.1 / localhost / artifacts.test, as files."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    ca_pem: Path
    good: tuple[Path, Path]  # (cert chain, key), signed by the CA
    expired: tuple[Path, Path]  # signed by the CA, validity ended yesterday
    self_signed: tuple[Path, Path]  # not signed by the CA

    def client_context(self) -> ssl.SSLContext:
        """Default verification, trusting the test CA: what production does with its CA."""
        return ssl.create_default_context(cafile=str(self.ca_pem))


def cert_name(common_name: str) -> x509.Name:
    """A subject or issuer of just a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_pem_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """`<stem>.crt` and `<stem>.key` (PEM, the key unencrypted PKCS8), as servers load them."""
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _server_cert(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(cert_name("localhost"))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("artifacts.test"),  # resolved by a fake DNS in tests
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def make_pki(directory: Path) -> TestPki:
    now = datetime.now(UTC)
    day = timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = cert_name("edge-mlops test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + 30 * day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = directory / "ca.crt"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    good_key = ec.generate_private_key(ec.SECP256R1())
    good = _server_cert(good_key, ca_name, ca_key, now - day, now + 7 * day)
    expired_key = ec.generate_private_key(ec.SECP256R1())
    expired = _server_cert(expired_key, ca_name, ca_key, now - 10 * day, now - day)
    own_key = ec.generate_private_key(ec.SECP256R1())
    self_signed = _server_cert(own_key, cert_name("localhost"), own_key, now - day, now + 7 * day)
    return TestPki(
        ca_pem=ca_pem,
        good=write_pem_pair(directory, "good", good, good_key),
        expired=write_pem_pair(directory, "expired", expired, expired_key),
        self_signed=write_pem_pair(directory, "self-signed", self_signed, own_key),
    )


# --- the artifact server -------------------------------------------------------------------


@dataclass
class Artifact:
    """A served file and the faults to inject when it is requested."""

    body: bytes
    etag: str | None = '"v1"'
    last_modified: str | None = "Wed, 25 Nov 2026 08:00:00 GMT"
    # Answer the first `status_times` requests with `status` (and Retry-After if given).
    status: int | None = None
    status_times: int = 1_000_000
    retry_after: str | None = None
    # Send 1 byte every `stall_interval_s` forever.
    stall_interval_s: float | None = None
    # Drop the connection after this fraction of the body on the first `reset_times` requests.
    reset_at: float | None = None
    reset_times: int = 1
    ignore_range: bool = False  # always answer 200 with the whole body
    truncate_to: int | None = None  # a complete reply that is just shorter
    flip_at: int | None = None  # one byte changed
    extra: bytes = b""  # appended after the body
    send_length: bool = True  # False: chunked, so the client cannot tell the length up front
    redirect_to: str | None = None
    served: int = 0
    resets_done: int = 0

    def payload(self) -> bytes:
        body = self.body if self.truncate_to is None else self.body[: self.truncate_to]
        if self.flip_at is not None:
            flipped = bytearray(body)
            flipped[self.flip_at] ^= 0xFF
            body = bytes(flipped)
        return body + self.extra


@dataclass(frozen=True)
class SeenRequest:
    path: str
    query: str
    range: str | None
    if_range: str | None


_RANGE = re.compile(r"bytes=(\d+)-")


class ArtifactServer:
    """An aiohttp HTTPS server on 127.0.0.1 (random port) serving :class:`Artifact` objects."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(*cert)
        self.artifacts: dict[str, Artifact] = {}
        self.requests: list[SeenRequest] = []
        self.port = 0
        app = web.Application()
        app.router.add_get("/{name:.+}", self._handle)
        # A short shutdown grace: stalled handlers must not hold the test up.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)

    async def start(self) -> None:
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, ssl_context=self._ssl)
        await site.start()

    async def close(self) -> None:
        await self._runner.cleanup()

    def url(self, name: str, host: str = "127.0.0.1", query: str = "sp=r&sig=SECRET") -> str:
        return f"https://{host}:{self.port}/{name}" + (f"?{query}" if query else "")

    def add(self, name: str, artifact: Artifact) -> str:
        """Serve ``artifact`` at ``/name``; returns its URL (with a SAS-like query)."""
        self.artifacts[name] = artifact
        return self.url(name)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append(
            SeenRequest(
                path=request.path,
                query=request.query_string,
                range=request.headers.get("Range"),
                if_range=request.headers.get("If-Range"),
            )
        )
        art = self.artifacts.get(name)
        if art is None:
            return web.Response(status=404)
        if art.redirect_to is not None:
            return web.Response(status=302, headers={"Location": art.redirect_to})
        if art.status is not None and art.served < art.status_times:
            art.served += 1
            headers = {"Retry-After": art.retry_after} if art.retry_after else {}
            return web.Response(status=art.status, headers=headers)
        art.served += 1
        return await self._send_body(request, art)

    async def _send_body(self, request: web.Request, art: Artifact) -> web.StreamResponse:
        payload = art.payload()
        headers = {}
        if art.etag:
            headers["ETag"] = art.etag
        if art.last_modified:
            headers["Last-Modified"] = art.last_modified
        start, status = 0, 200
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if_range = request.headers.get("If-Range")
        if match and not art.ignore_range and if_range in (None, art.etag, art.last_modified):
            start, status = int(match[1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(payload) - 1}/{len(payload)}"
        resp = web.StreamResponse(status=status, headers=headers)
        if art.send_length:
            resp.content_length = len(payload) - start
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            if art.stall_interval_s is not None:
                for i in range(start, len(payload)):
                    await resp.write(payload[i : i + 1])
                    await asyncio.sleep(art.stall_interval_s)
            elif art.reset_at is not None and art.resets_done < art.reset_times:
                art.resets_done += 1
                await resp.write(payload[start : int(len(art.body) * art.reset_at)])
                await asyncio.sleep(0.05)  # let the bytes leave before the reset
                transport = request.transport
                assert transport is not None
                # SO_LINGER 0 makes close send a TCP RST, as a dropped link or proxy does.
                transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                transport.abort()
                return resp
            else:
                for i in range(start, len(payload), 16 * 1024):
                    await resp.write(payload[i : i + 16 * 1024])
            await resp.write_eof()
        except ConnectionError:
            pass  # the client gave up (a stall it detected): nothing to finish
        return resp


@contextlib.asynccontextmanager
async def _started(server: ArtifactServer) -> AsyncIterator[ArtifactServer]:
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture(scope="session")
def artifact_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def artifact_server(artifact_pki: TestPki) -> AsyncIterator[ArtifactServer]:
    """HTTPS on 127.0.0.1 with a certificate from the test CA."""
    async with _started(ArtifactServer(artifact_pki.good)) as server:
        yield server


@pytest.fixture
async def expired_cert_server(artifact_pki: TestPki) -> AsyncIterator[ArtifactServer]:
    async with _started(ArtifactServer(artifact_pki.expired)) as server:
        yield server


@pytest.fixture
async def self_signed_server(artifact_pki: TestPki) -> AsyncIterator[ArtifactServer]:
    async with _started(ArtifactServer(artifact_pki.self_signed)) as server:
        yield server

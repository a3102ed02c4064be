"""Bounded, verified artifact download over HTTPS.

A download is only ever *of a digest*: the caller passes the manifest's ``sha256`` and ``size``
and a temp file from the store; the bytes get their final name only after the caller commits
them, which it does only when :meth:`Downloader.fetch` returned without error. The rules:

* URL policy, checked on the first URL and on every redirect hop (followed by hand, at most
  ``max_redirects``): ``https`` only (``http`` only for hosts named in ``allow_http_hosts``,
  meant for tests), host on the allow-list (exact, or ``*.suffix`` for subdomains), no userinfo,
  no link-local / multicast / unspecified / reserved IP literal.
* Addresses: names are resolved through a guard that drops the same forbidden addresses, so
  DNS cannot point an allow-listed name at the metadata service.
* Bounds: at most ``size + 1`` bytes are ever read (a longer body is ``size_mismatch``), an
  overall deadline, and a throughput floor over a sliding window (a stalled server is a
  ``timeout``).
* Resume: after a dropped connection the next attempt asks for ``Range: bytes=N-`` with
  ``If-Range`` (strong ETag, else Last-Modified); a ``206`` appends, a ``200`` starts over.
* Retries: connection errors, stalls, 408/429/5xx are retried with jittered exponential
  back-off that honours ``Retry-After`` (capped); other statuses (403 expired SAS, 404) are
  not retried, so a broken URL cannot cause a retry storm.
* TLS: default certificate verification; an injected :class:`ssl.SSLContext` may add a CA.
* Logs carry ``scheme://host/path`` only: query strings hold SAS signatures.

Failures raise :class:`DeliveryError` with a bounded ``reason``; the temp file is removed on
every failure and on cancellation (a superseded download does not leave half a file behind).

The policy checks, ``Retry-After`` parsing, back-off and throughput maths are pure functions at
the top of this module; :class:`Downloader` is the I/O edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pydantic import BeforeValidator, Field, model_validator
from yarl import URL

from agent.config import Section
from agent.releases.store import WritableFile, is_disk_full
from wire.reasons import AgentError, Reason

__all__ = [
    "ContentRange",
    "DeliveryError",
    "DownloadPolicy",
    "Downloader",
    "PartSink",
    "ThroughputMonitor",
    "backoff_delay",
    "check_url",
    "host_allowed",
    "parse_content_range",
    "parse_retry_after",
    "redact_url",
]


class DeliveryError(AgentError):
    """A download that did not deliver the expected bytes; nothing was left to commit.

    ``detail`` is a short token from a fixed set (``tls``, ``http_404``, ``scheme``, ...),
    for logs and humans; ``reason`` is what callers branch on.
    """

    def __init__(self, reason: Reason, message: str, *, detail: str = "") -> None:
        super().__init__(reason, message)
        self.detail = detail


def _host_list(value: object) -> object:
    """`EDGEML_ALLOWED_HOSTS=a,*.b` as a tuple; lists and tuples pass through."""
    if isinstance(value, str):
        return tuple(name.strip().lower() for name in value.split(",") if name.strip())
    return value


_Hosts = Annotated[tuple[str, ...], BeforeValidator(_host_list)]


class DownloadPolicy(Section):
    """Download limits, with production defaults (Azure Blob Storage, a slow edge uplink)."""

    # Exact host names or "*.suffix" (any subdomain of suffix, not suffix itself).
    allowed_hosts: _Hosts = ("*.blob.core.windows.net",)
    # Exact hosts that may be reached over plain http: for tests and labs, never production.
    allow_http_hosts: _Hosts = ()
    # Extra CA bundle for artifact TLS (a lab's own CA); the system store otherwise.
    artifact_ca_file: Path | None = None
    deadline_s: float = Field(1800.0, gt=0.0, alias="download_deadline_s")
    # 0 disables the floor
    min_bytes_per_s: float = Field(1024.0, ge=0.0, alias="download_min_bytes_per_s")
    throughput_window_s: float = Field(10.0, gt=0.0, alias="download_throughput_window_s")
    max_retries: int = Field(5, ge=0, alias="download_max_retries")
    backoff_base_s: float = Field(1.0, gt=0.0, alias="download_backoff_base_s")
    backoff_cap_s: float = Field(60.0, gt=0.0, alias="download_backoff_cap_s")
    retry_after_cap_s: float = Field(300.0, ge=0.0, alias="download_retry_after_cap_s")
    max_redirects: int = Field(5, ge=0, alias="download_max_redirects")
    connect_timeout_s: float = Field(30.0, gt=0.0, alias="download_connect_timeout_s")
    chunk_bytes: int = Field(64 * 1024, gt=0, alias="download_chunk_bytes")
    # True lets aiohttp use HTTPS_PROXY / NO_PROXY from the environment (IoT Edge proxies).
    trust_env: bool = Field(False, alias="download_trust_env")

    @model_validator(mode="after")
    def _patterns(self) -> DownloadPolicy:
        for pattern in (*self.allowed_hosts, *self.allow_http_hosts):
            if pattern != pattern.lower() or "*" in pattern.removeprefix("*.") or not pattern:
                raise ValueError(f"host pattern {pattern!r}: lowercase, exact or '*.suffix'")
        if any(p.startswith("*") for p in self.allow_http_hosts):
            raise ValueError("allow_http_hosts takes exact host names only")
        return self


# --- pure policy ---------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """``host`` matches an exact pattern, or is a subdomain of a ``*.suffix`` pattern."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".example.net"
            if host.endswith(suffix) and len(host) > len(suffix) and not _is_ip(host):
                return True
        elif host == pattern:
            return True
    return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _forbidden_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved


def _rejected(message: str, detail: str) -> DeliveryError:
    return DeliveryError(Reason.URL_REJECTED, message, detail=detail)


def check_url(url: str, policy: DownloadPolicy, base: URL | None = None) -> URL:
    """Parse ``url`` (relative to ``base`` for a redirect) and apply the URL policy.

    Raises :class:`DeliveryError` ``url_rejected``; the message never carries the query.
    """
    if _CONTROL.search(url):
        raise _rejected("URL contains whitespace, control characters or backslashes", "syntax")
    # yarl silently drops an empty userinfo ("https://@host/"), so look at the raw authority.
    if "@" in urlsplit(url).netloc:
        raise _rejected("URL carries userinfo", "userinfo")
    try:
        parsed = URL(url)
        # A redirect may be relative, or scheme-relative ("//host/path"): resolve it first.
        target = base.join(parsed) if base is not None and not parsed.scheme else parsed
    except ValueError as e:
        raise _rejected("URL does not parse", "syntax") from e
    scheme = target.scheme.lower()
    host = (target.raw_host or "").lower().rstrip(".")
    if not target.is_absolute() or not host:
        raise _rejected(f"URL has no host (scheme {scheme!r})", "syntax")
    shown = redact_url(target)
    if scheme not in ("https", "http"):
        raise _rejected(f"scheme {scheme!r} is not allowed: {shown}", "scheme")
    if scheme == "http" and host not in policy.allow_http_hosts:
        raise _rejected(f"plain http is not allowed for this host: {shown}", "scheme")
    if _forbidden_ip(target.host or ""):
        raise _rejected(f"link-local, multicast or unspecified address: {shown}", "address")
    if not host_allowed(host, policy.allowed_hosts):
        raise _rejected(f"host is not on the allow-list: {shown}", "host")
    return target


def redact_url(url: URL | str) -> str:
    """``scheme://host[:port]/path`` only: no userinfo, query (SAS ``sig=``) or fragment."""
    try:
        u = url if isinstance(url, URL) else URL(url)
        port = f":{u.explicit_port}" if u.explicit_port is not None else ""
    except (ValueError, TypeError):
        return "<unparseable url>"
    host = u.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    # raw_path stays percent-encoded, so a CR/LF in the path cannot forge a log line.
    return f"{u.scheme}://{host}{port}{u.raw_path}"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value[:12]), 10**9))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # RFC 9110 HTTP-dates are GMT
    return max(0.0, (when - now).total_seconds())


def backoff_delay(
    retry: int, policy: DownloadPolicy, rng: random.Random, retry_after: float | None = None
) -> float:
    """Delay before retry number ``retry`` (1-based): capped exponential with equal jitter,
    and never shorter than the server's ``Retry-After`` (itself capped).
    """
    exp = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0 ** min(retry - 1, 62))
    # Equal jitter: half fixed so retries stay spaced, half random so devices spread out.
    delay = exp / 2 + rng.uniform(0, exp / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.retry_after_cap_s))
    return delay


@dataclass(frozen=True)
class ContentRange:
    start: int
    end: int
    total: int | None


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def parse_content_range(value: str | None) -> ContentRange | None:
    """Parse ``Content-Range: bytes a-b/n`` (or ``/*``); None when absent or malformed."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    start, end = int(match[1]), int(match[2])
    if end < start:
        return None
    total = None if match[3] == "*" else int(match[3])
    if total is not None and end >= total:
        return None
    return ContentRange(start, end, total)


@dataclass
class ThroughputMonitor:
    """Bytes over a sliding window; too slow once a full window has passed below the floor."""

    window_s: float
    min_bytes_per_s: float
    started: float
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _in_window: int = 0

    def record(self, now: float, nbytes: int) -> None:
        self._expire(now)  # keeps the deque to one window, however fast the link
        self._samples.append((now, nbytes))
        self._in_window += nbytes

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] <= now - self.window_s:
            self._in_window -= self._samples.popleft()[1]

    def too_slow(self, now: float) -> bool:
        if self.min_bytes_per_s <= 0 or now - self.started < self.window_s:
            return False
        self._expire(now)
        return self._in_window < self.min_bytes_per_s * self.window_s

    def seconds_until_check(self, now: float) -> float:
        """How long a read may wait before the floor must be checked again."""
        first = self.started + self.window_s - now
        # After the first full window, re-check a few times per window: a stall is then
        # caught within a quarter window of falling under the floor.
        return max(first, self.window_s / 4, 0.001)


# --- I/O -----------------------------------------------------------------------------------


class _GuardedResolver(AbstractResolver):
    """Drops resolved addresses the URL policy forbids as literals (link-local, multicast...).

    Without it an allow-listed name whose DNS answer points at 169.254.169.254 (the cloud
    metadata service) would slip past the literal check.
    """

    def __init__(self, inner: AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not _forbidden_ip(r["host"])]
        if not allowed:
            # Not an OSError on purpose: aiohttp would wrap that as a retryable DNS failure.
            raise _rejected(f"{host} resolves only to forbidden addresses", "address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class PartSink(Protocol):
    """Where the bytes go: :class:`agent.releases.store.PartFile` is the production one."""

    def open(self, *, append: bool) -> WritableFile: ...

    def remove(self) -> None: ...


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUS = frozenset({408, 429})


class _RetryableError(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(
        self, reason: Reason, message: str, detail: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail
        self.retry_after = retry_after


@dataclass
class _Job:
    """One fetch: what is expected, where it goes, and the bytes already written."""

    sha256: str
    size: int
    part: PartSink
    deadline: float
    log: structlog.typing.FilteringBoundLogger
    retries: int = 0
    received: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    validator: str | None = None  # for If-Range: a strong ETag or a Last-Modified date

    def restart(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.validator = None


def _validator(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator (RFC 9110)
        return str(etag)
    modified = headers.get("Last-Modified")
    return str(modified) if modified else None


class Downloader:
    """Fetches one artifact at a time into a store part file; see the module docstring."""

    def __init__(
        self,
        policy: DownloadPolicy | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        resolver_factory: Callable[[], AbstractResolver] = DefaultResolver,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.policy = policy or DownloadPolicy()
        # A factory, not an instance: a resolver binds to the running loop when created.
        self._resolver_factory = resolver_factory
        # None means aiohttp's default: system trust store, hostname checked.
        self._ssl: ssl.SSLContext | Literal[True] = ssl_context or True
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not cryptography
        self._log: structlog.typing.FilteringBoundLogger = logger or structlog.get_logger(
            "agent.releases.download"
        )

    async def fetch(self, url: str, *, sha256: str, size: int, part: PartSink) -> None:
        """Download ``url`` into ``part``; on return it holds exactly ``size`` bytes hashing
        to ``sha256``. Raises :class:`DeliveryError`; removes ``part`` on any failure and on
        cancellation (then re-raises ``CancelledError``).
        """
        policy = self.policy
        target = check_url(url, policy)  # before anything touches the network
        started = self._clock()
        job = _Job(
            sha256=sha256,
            size=size,
            part=part,
            deadline=started + policy.deadline_s,
            log=self._log.bind(url=redact_url(target), sha256=sha256, size=size),
        )
        job.log.info("download_started")
        try:
            await self._download(target, job)
            _check_complete(job)
        except DeliveryError as e:
            part.remove()
            job.log.warning(
                "download_failed", reason=str(e.reason), detail=e.detail, retries=job.retries
            )
            raise
        except BaseException:
            # Cancellation (a newer manifest won) or a bug: never leave unverified bytes behind.
            part.remove()
            job.log.info("download_abandoned", received=job.received)
            raise
        job.log.info(
            "download_completed",
            retries=job.retries,
            duration_s=round(self._clock() - started, 3),
        )

    async def _download(self, target: URL, job: _Job) -> None:
        """Attempts, with back-off between them, until one delivers or the budget is spent."""
        policy = self.policy
        # The connector does not close a resolver it was given: this method owns it.
        resolver = _GuardedResolver(self._resolver_factory())
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, resolver=resolver),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout_s),
                auto_decompress=False,  # the digest is of the bytes as stored
                trust_env=policy.trust_env,
            ) as session:
                while True:
                    try:
                        await self._attempt(session, target, job)
                    except _RetryableError as e:
                        job.retries += 1
                        await self._back_off(job, e)
                    else:
                        return
        finally:
            await resolver.close()

    async def _back_off(self, job: _Job, error: _RetryableError) -> None:
        policy = self.policy
        retries = job.retries
        if retries > policy.max_retries:
            raise DeliveryError(
                error.reason,
                f"gave up after {retries} attempts: {error.message}",
                detail=error.detail,
            ) from error
        delay = backoff_delay(retries, policy, self._rng, error.retry_after)
        if self._clock() + delay >= job.deadline:
            raise DeliveryError(
                Reason.TIMEOUT,
                f"deadline of {policy.deadline_s}s reached after: {error.message}",
                detail="deadline",
            ) from error
        job.log.warning(
            "download_retry",
            retry=retries,
            delay_s=round(delay, 3),
            reason=str(error.reason),
            detail=error.detail,
            received=job.received,
        )
        await self._sleep(delay)

    async def _attempt(self, session: aiohttp.ClientSession, target: URL, job: _Job) -> None:
        remaining = job.deadline - self._clock()
        if remaining <= 0:
            raise DeliveryError(Reason.TIMEOUT, "deadline reached", detail="deadline")
        if job.received >= job.size:
            return  # everything arrived before the connection dropped; the digest decides
        headers = {"Accept-Encoding": "identity"}
        if job.received and job.validator:
            headers["Range"] = f"bytes={job.received}-"
            headers["If-Range"] = job.validator
        elif job.received:
            job.restart()  # no validator: resuming could splice two different files
        try:
            async with asyncio.timeout(remaining) as deadline_cm:
                url = target
                for _hop in range(self.policy.max_redirects + 1):
                    async with session.get(url, headers=headers, allow_redirects=False) as resp:
                        if resp.status in _REDIRECTS:
                            url = self._next_hop(url, resp, job)
                            continue
                        await self._receive(resp, job, ranged="Range" in headers)
                        return
                raise DeliveryError(
                    Reason.FETCH_FAILED,
                    f"more than {self.policy.max_redirects} redirects",
                    detail="too_many_redirects",
                )
        except aiohttp.ClientSSLError as e:
            # Certificate verification failures (self-signed, expired, wrong host) and
            # handshake failures: retrying cannot fix them.
            raise DeliveryError(
                Reason.FETCH_FAILED, f"TLS failure: {type(e).__name__}", detail="tls"
            ) from e
        except (aiohttp.ClientError, ConnectionError) as e:
            raise _RetryableError(
                Reason.FETCH_FAILED, f"connection failed: {type(e).__name__}", "connection"
            ) from e
        except TimeoutError as e:
            if deadline_cm.expired():
                raise DeliveryError(
                    Reason.TIMEOUT,
                    f"deadline of {self.policy.deadline_s}s reached",
                    detail="deadline",
                ) from e
            raise _RetryableError(
                Reason.TIMEOUT, f"timed out: {type(e).__name__}", "connect_timeout"
            ) from e

    def _next_hop(self, url: URL, resp: aiohttp.ClientResponse, job: _Job) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise DeliveryError(
                Reason.FETCH_FAILED,
                f"redirect {resp.status} without Location",
                detail="bad_redirect",
            )
        nxt = check_url(location, self.policy, base=url)
        job.log.info("download_redirect", status=resp.status, to=redact_url(nxt))
        return nxt

    async def _receive(self, resp: aiohttp.ClientResponse, job: _Job, *, ranged: bool) -> None:
        status = resp.status
        if status == 206 and ranged:
            cr = parse_content_range(resp.headers.get("Content-Range"))
            if cr is None or cr.start != job.received or cr.total not in (None, job.size):
                job.restart()
                raise _RetryableError(
                    Reason.FETCH_FAILED, "partial reply does not fit", "bad_range"
                )
            append = True
            job.log.info("download_resumed", offset=job.received)
        elif status == 200:
            if ranged:
                # If-Range did not match (the file changed) or Range is unsupported: start over.
                job.log.info("download_restarted", discarded=job.received)
            job.restart()
            job.validator = _validator(resp.headers)
            append = False
        elif status == 416:
            job.restart()
            raise _RetryableError(Reason.FETCH_FAILED, "range not satisfiable", "http_416")
        elif status in _RETRYABLE_STATUS or status >= 500:
            raise _RetryableError(
                Reason.FETCH_FAILED,
                f"HTTP {status}",
                _status_detail(status),
                parse_retry_after(resp.headers.get("Retry-After"), self._wall_clock()),
            )
        else:
            # 403 (expired SAS), 404, 206 to a request without Range...: retrying cannot help.
            raise DeliveryError(
                Reason.FETCH_FAILED, f"HTTP {status}", detail=_status_detail(status)
            )
        expected = job.size - job.received
        if resp.content_length is not None and resp.content_length != expected:
            raise DeliveryError(
                Reason.SIZE_MISMATCH,
                f"server announces {resp.content_length} bytes, expected {expected}",
                detail="content_length",
            )
        await self._stream(resp, job, append=append)

    async def _stream(self, resp: aiohttp.ClientResponse, job: _Job, *, append: bool) -> None:
        try:
            sink = job.part.open(append=append)
        except OSError as e:
            raise _local_error(e) from e
        try:
            await self._copy(resp, job, sink)
        except BaseException:
            with contextlib.suppress(OSError):
                sink.close()  # the failure already in flight is the one to report
            raise
        try:
            sink.close()
        except OSError as e:  # a buffered write can fail at close too
            raise _local_error(e) from e

    async def _copy(self, resp: aiohttp.ClientResponse, job: _Job, sink: WritableFile) -> None:
        policy = self.policy
        monitor = ThroughputMonitor(
            policy.throughput_window_s, policy.min_bytes_per_s, started=self._clock()
        )
        while True:
            # Never ask for more than one byte past the cap: a longer body is caught at
            # size + 1 without reading the rest of it.
            want = min(policy.chunk_bytes, job.size + 1 - job.received)
            wait = monitor.seconds_until_check(self._clock())
            chunk: bytes | None = None  # stays None if nothing arrives in time: the floor decides
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races the read's completion (CPython gh-86296), and a superseded download would
            # then go on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    chunk = await resp.content.read(want)
            now = self._clock()
            if chunk == b"":
                return
            if chunk:
                if job.received + len(chunk) > job.size:
                    raise DeliveryError(
                        Reason.SIZE_MISMATCH,
                        f"body is longer than {job.size} bytes",
                        detail="too_long",
                    )
                try:
                    sink.write(chunk)
                except OSError as e:
                    raise _local_error(e) from e
                job.received += len(chunk)
                job.digest.update(chunk)
                monitor.record(now, len(chunk))
            if monitor.too_slow(now):
                raise _RetryableError(
                    Reason.TIMEOUT,
                    f"below {policy.min_bytes_per_s} B/s over {policy.throughput_window_s}s",
                    "throughput",
                )


def _check_complete(job: _Job) -> None:
    if job.received != job.size:
        raise DeliveryError(
            Reason.SIZE_MISMATCH,
            f"got {job.received} bytes, expected {job.size}",
            detail="short",
        )
    if job.digest.hexdigest() != job.sha256:
        raise DeliveryError(Reason.HASH_MISMATCH, "sha256 of the body differs", detail="sha256")


def _status_detail(status: int) -> str:
    return f"http_{status}" if 100 <= status < 600 else "http_status"


def _local_error(error: OSError) -> DeliveryError:
    if is_disk_full(error):
        return DeliveryError(
            Reason.DISK_FULL, "disk full while writing the artifact", detail="enospc"
        )
    return DeliveryError(
        Reason.FETCH_FAILED,
        f"cannot write the artifact: {error.strerror}",
        detail="local_io",
    )

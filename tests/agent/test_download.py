"""Verified download: URL policy, back-off maths, and a transfer's failures against a real
HTTPS server on loopback with injected faults.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from structlog.testing import capture_logs
from yarl import URL

from agent.releases.download import (
    ContentRange,
    DeliveryError,
    Downloader,
    DownloadPolicy,
    ThroughputMonitor,
    backoff_delay,
    check_url,
    host_allowed,
    parse_content_range,
    parse_retry_after,
    redact_url,
)
from agent.releases.state import ModelRef, StoreState
from agent.releases.store import ModelStore
from tests.support.artifact_server import (
    Artifact,
    ArtifactServer,
    FullDisk,
    RecordingSleep,
    TestPki,
)
from wire.reasons import Reason

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
BODY = bytes(random.Random(7).randbytes(200_000))
SHA = hashlib.sha256(BODY).hexdigest()
POLICY = DownloadPolicy(allowed_hosts=("*.blob.core.windows.net", "models.example.net"))


# --- URL policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("acct.blob.core.windows.net", ("*.blob.core.windows.net",), True),
        ("a.b.blob.core.windows.net", ("*.blob.core.windows.net",), True),
        ("ACCT.Blob.Core.Windows.Net.", ("*.blob.core.windows.net",), True),
        ("blob.core.windows.net", ("*.blob.core.windows.net",), False),
        ("evilblob.core.windows.net", ("*.blob.core.windows.net",), False),
        ("blob.core.windows.net.evil.com", ("*.blob.core.windows.net",), False),
        ("models.example.net", ("models.example.net",), True),
        ("x.models.example.net", ("models.example.net",), False),
        ("127.0.0.1", ("127.0.0.1",), True),
        ("127.0.0.1", ("*.0.0.1",), False),  # a wildcard never matches an IP literal
        ("anything", (), False),
    ],
)
def test_host_allowed(host: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("file:///etc/passwd", "syntax"),
        ("ftp://models.example.net/m.onnx", "scheme"),
        ("http://models.example.net/m.onnx", "scheme"),
        ("https://169.254.169.254/latest/meta-data", "address"),
        ("https://[fe80::1]/m.onnx", "address"),
        ("https://[::ffff:169.254.169.254]/m.onnx", "address"),
        ("https://224.0.0.1/m.onnx", "address"),
        ("https://0.0.0.0/m.onnx", "address"),
        ("https://[::]/m.onnx", "address"),
        ("https://user:pw@models.example.net/m.onnx", "userinfo"),
        ("https://@models.example.net/m.onnx", "userinfo"),
        ("https://models.example.net@evil.example/m.onnx", "userinfo"),
        ("https://evil.example/m.onnx", "host"),
        ("https://models.example.net.evil.example/m.onnx", "host"),
        ("https://10.0.0.5/m.onnx", "host"),
        ("/relative/m.onnx", "syntax"),
        ("https://models.example.net/a b", "syntax"),
        ("https://models.example.net/a\r\nX-Injected: 1", "syntax"),
        ("https:\\\\models.example.net\\m.onnx", "syntax"),
        ("https:///m.onnx", "syntax"),
    ],
)
def test_rejected_urls(url: str, detail: str) -> None:
    """Refused URLs: file://, http://, link-local, userinfo, non-allow-listed host."""
    # The link-local and other addresses are allow-listed here on purpose: the address
    # check must hold even when an operator lists an IP.
    policy = DownloadPolicy(
        allowed_hosts=(*POLICY.allowed_hosts, "169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0")
    )
    with pytest.raises(DeliveryError) as info:
        check_url(url, policy)
    assert info.value.reason is Reason.URL_REJECTED
    assert info.value.detail == detail


@pytest.mark.parametrize(
    ("url", "policy", "expected"),
    [
        ("https://acct.blob.core.windows.net/c/m.onnx?sig=x", POLICY, "acct.blob.core.windows.net"),
        ("https://models.example.net:8443/m.onnx", POLICY, "models.example.net"),
        (
            "http://127.0.0.1:8080/m.onnx",
            DownloadPolicy(allowed_hosts=("127.0.0.1",), allow_http_hosts=("127.0.0.1",)),
            "127.0.0.1",
        ),
    ],
)
def test_accepted_urls(url: str, policy: DownloadPolicy, expected: str) -> None:
    assert check_url(url, policy).host == expected


def test_http_needs_both_the_http_exception_and_the_allow_list() -> None:
    policy = DownloadPolicy(allowed_hosts=("models.example.net",), allow_http_hosts=("lab",))
    with pytest.raises(DeliveryError):
        check_url("http://lab/m.onnx", policy)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/other/m.onnx", "https://models.example.net/other/m.onnx"),
        ("m2.onnx?sig=y", "https://models.example.net/a/m2.onnx?sig=y"),
        ("//acct.blob.core.windows.net/m.onnx", "https://acct.blob.core.windows.net/m.onnx"),
    ],
)
def test_redirect_locations_resolve_against_the_current_url(location: str, expected: str) -> None:
    base = URL("https://models.example.net/a/m.onnx?sig=x")
    assert str(check_url(location, POLICY, base=base)) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://a.blob.core.windows.net/c/m.onnx?sv=1&sig=SECRET",
            "https://a.blob.core.windows.net/c/m.onnx",
        ),
        ("https://u:p@h.example:8443/p#frag", "https://h.example:8443/p"),
        ("https://h.example/a%0d%0ab", "https://h.example/a%0D%0Ab"),
        ("https://[::1]:9/x", "https://[::1]:9/x"),
    ],
)
def test_redact_url_keeps_scheme_host_path_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "bad",
    [
        {"allowed_hosts": ("Upper.example",)},
        {"allowed_hosts": ("a.*.example",)},
        {"allow_http_hosts": ("*.example",)},
        {"deadline_s": 0},
        {"max_retries": -1},
    ],
)
def test_policy_refuses_malformed_settings(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"host|greater than"):
        DownloadPolicy(**bad)


# --- retry maths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("Thu, 26 Nov 2026 12:00:30 GMT", 30.0),
        ("Thu, 26 Nov 2026 11:00:00 GMT", 0.0),  # in the past: retry now
        ("99999999999999999999", 1e9),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, NOW) == expected


class _TopOfRange(random.Random):
    """Jitter that always picks the top of its range: makes back-off a plain table."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _BottomOfRange(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.mark.parametrize(
    ("retry", "rng", "retry_after", "expected"),
    [
        (1, _TopOfRange(), None, 1.0),
        (2, _TopOfRange(), None, 2.0),
        (3, _TopOfRange(), None, 4.0),
        (3, _BottomOfRange(), None, 2.0),
        (10, _TopOfRange(), None, 60.0),  # capped
        (10, _BottomOfRange(), None, 30.0),
        (1, _TopOfRange(), 7.0, 7.0),  # Retry-After is longer: it wins
        (3, _TopOfRange(), 0.5, 4.0),  # Retry-After is shorter: back-off still applies
        (1, _TopOfRange(), 1e6, 300.0),  # Retry-After capped
        (500, _TopOfRange(), None, 60.0),  # no overflow on absurd retry counts
    ],
)
def test_backoff_delay(
    retry: int, rng: random.Random, retry_after: float | None, expected: float
) -> None:
    assert backoff_delay(retry, DownloadPolicy(), rng, retry_after) == expected


def test_backoff_jitter_spreads_devices() -> None:
    rng = random.Random(1)
    delays = {round(backoff_delay(4, DownloadPolicy(), rng), 6) for _ in range(50)}
    assert len(delays) > 40
    assert all(4.0 <= d <= 8.0 for d in delays)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes 100-199/200", ContentRange(100, 199, 200)),
        ("bytes 0-0/*", ContentRange(0, 0, None)),
        ("bytes 100-99/200", None),
        ("bytes 100-200/200", None),
        ("bytes */200", None),
        ("items 0-1/2", None),
        (None, None),
    ],
)
def test_parse_content_range(header: str | None, expected: ContentRange | None) -> None:
    assert parse_content_range(header) == expected


@pytest.mark.parametrize(
    ("events", "check_at", "too_slow"),
    [
        ([], 9.9, False),  # the first window is not over yet
        ([], 10.0, True),
        ([(1.0, 20_000)], 10.0, False),
        ([(1.0, 10_239)], 10.0, True),  # one byte under 1 KiB/s over 10 s
        ([(1.0, 20_000)], 11.0, True),  # the burst left the window
        ([(1.0, 5_000), (9.0, 6_000)], 12.0, True),
        ([(3.0, 5_000), (9.0, 6_000)], 12.0, False),
    ],
)
def test_throughput_floor_over_a_sliding_window(
    events: list[tuple[float, int]], check_at: float, too_slow: bool
) -> None:
    monitor = ThroughputMonitor(window_s=10.0, min_bytes_per_s=1024, started=0.0)
    for at, nbytes in events:
        monitor.record(at, nbytes)
    assert monitor.too_slow(check_at) is too_slow


def test_throughput_floor_zero_disables_it() -> None:
    assert not ThroughputMonitor(10.0, 0, started=0.0).too_slow(1e6)


# --- against the loopback HTTPS server -----------------------------------------------------


class FakeDns(AbstractResolver):
    """Answers from a table, so a test can point a name anywhere without a DNS server."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=self.answers[host],
                port=port,
                family=family,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


def downloader(
    pki: TestPki, sleep: RecordingSleep | None = None, dns: FakeDns | None = None, **policy: Any
) -> Downloader:
    settings: dict[str, Any] = {
        "allowed_hosts": ("127.0.0.1", "localhost"),
        "throughput_window_s": 0.3,
        "min_bytes_per_s": 1024.0,
        "max_retries": 3,
        "connect_timeout_s": 5.0,
    }
    settings.update(policy)
    return Downloader(
        DownloadPolicy(**settings),
        ssl_context=pki.client_context(),
        sleep=sleep or RecordingSleep(),
        wall_clock=lambda: NOW,
        rng=random.Random(0),
        resolver_factory=DefaultResolver if dns is None else lambda: dns,
    )


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "vol")
    store.open()
    return store


async def fetch_into(
    d: Downloader, store: ModelStore, url: str, sha: str = SHA, size: int = len(BODY)
) -> DeliveryError | None:
    """Fetch and commit as the swap pipeline will; returns the error if there was one."""
    try:
        await d.fetch(url, sha256=sha, size=size, part=store.artifact_part(sha))
    except DeliveryError as e:
        assert not store.artifact_part(sha).path.exists(), "a failed fetch left its temp file"
        return e
    store.commit_artifact(sha)
    return None


async def test_download_verifies_and_commits(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    url = artifact_server.add("m.onnx", Artifact(BODY))
    with capture_logs() as logs:
        assert await fetch_into(downloader(artifact_pki), store, url) is None
    assert store.artifact_path(SHA).read_bytes() == BODY
    assert store.verify_artifact(SHA)
    assert len(artifact_server.requests) == 1
    assert [e["event"] for e in logs] == [
        "download_started",
        "download_completed",
        "store_artifact_committed",
    ]


async def test_logs_never_carry_the_query_string(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A SAS `sig=` stays out of logs, also on failures and retries."""
    url = artifact_server.add("m.onnx", Artifact(BODY, status=503, status_times=1))
    with capture_logs() as logs:
        await fetch_into(downloader(artifact_pki), store, url)
        await fetch_into(downloader(artifact_pki), store, artifact_server.url("missing"))
    assert logs
    assert "SECRET" not in repr(logs)
    assert logs[0]["url"] == f"https://127.0.0.1:{artifact_server.port}/m.onnx"


async def test_reset_at_60_percent_resumes_with_range_and_if_range(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """Resume: the second request continues where the first stopped; the hash is checked."""
    sleep = RecordingSleep()
    url = artifact_server.add("m.onnx", Artifact(BODY, reset_at=0.6))
    assert await fetch_into(downloader(artifact_pki, sleep), store, url) is None
    first, second = artifact_server.requests
    assert first.range is None
    assert second.range is not None
    offset = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= int(len(BODY) * 0.6)
    assert second.if_range == '"v1"'
    assert len(sleep.delays) == 1
    assert store.artifact_path(SHA).read_bytes() == BODY


async def test_resume_uses_last_modified_without_a_strong_etag(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    url = artifact_server.add("m.onnx", Artifact(BODY, reset_at=0.6, etag='W/"weak"'))
    assert await fetch_into(downloader(artifact_pki), store, url) is None
    assert artifact_server.requests[1].if_range == "Wed, 25 Nov 2026 08:00:00 GMT"


async def test_without_any_validator_the_retry_starts_from_zero(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    url = artifact_server.add("m.onnx", Artifact(BODY, reset_at=0.6, etag=None, last_modified=None))
    assert await fetch_into(downloader(artifact_pki), store, url) is None
    assert [r.range for r in artifact_server.requests] == [None, None]


async def test_a_200_answer_to_a_range_request_restarts_cleanly(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A server that ignores Range sends the whole body; it must not be appended."""
    url = artifact_server.add("m.onnx", Artifact(BODY, reset_at=0.6, ignore_range=True))
    with capture_logs() as logs:
        assert await fetch_into(downloader(artifact_pki), store, url) is None
    assert artifact_server.requests[1].range is not None
    assert "download_restarted" in [e["event"] for e in logs]
    assert store.artifact_path(SHA).read_bytes() == BODY


async def test_stall_is_aborted_by_the_throughput_floor_and_retried(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A stalled server: 1 byte per 50 ms against a 1 KiB/s floor over 0.3 s; retried, then
    `timeout`."""
    sleep = RecordingSleep()
    url = artifact_server.add("m.onnx", Artifact(BODY, stall_interval_s=0.05))
    started = time.monotonic()
    error = await fetch_into(downloader(artifact_pki, sleep, max_retries=2), store, url)
    elapsed = time.monotonic() - started
    assert error is not None
    assert error.reason is Reason.TIMEOUT
    assert error.detail == "throughput"
    assert len(artifact_server.requests) == 3
    assert len(sleep.delays) == 2
    assert sleep.delays[1] > sleep.delays[0] / 2  # exponential with jitter: not shrinking
    assert 0.85 <= elapsed < 5


async def test_stall_is_aborted_by_the_overall_deadline(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A stalled server with the floor off: the deadline alone bounds the download."""
    url = artifact_server.add("m.onnx", Artifact(BODY, stall_interval_s=0.05))
    started = time.monotonic()
    error = await fetch_into(
        downloader(artifact_pki, min_bytes_per_s=0, deadline_s=0.5), store, url
    )
    assert error is not None
    assert (error.reason, error.detail) == (Reason.TIMEOUT, "deadline")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("status", [403, 404])
async def test_403_and_404_fail_without_retry(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore, status: int
) -> None:
    """A refusal causes no retry storm: exactly one request, no back-off."""
    sleep = RecordingSleep()
    url = artifact_server.add("m.onnx", Artifact(BODY, status=status))
    error = await fetch_into(downloader(artifact_pki, sleep), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, f"http_{status}")
    assert len(artifact_server.requests) == 1
    assert sleep.delays == []


@pytest.mark.parametrize(
    ("status", "retry_after", "at_least"),
    [
        (429, "7", 7.0),
        (503, "Thu, 26 Nov 2026 12:00:30 GMT", 30.0),
        (503, "86400", 300.0),  # capped at retry_after_cap_s
    ],
)
async def test_429_and_503_back_off_honouring_retry_after(
    *,
    artifact_server: ArtifactServer,
    artifact_pki: TestPki,
    store: ModelStore,
    status: int,
    retry_after: str,
    at_least: float,
) -> None:
    """A busy server: the wait is the server's Retry-After (capped), then the download succeeds."""
    sleep = RecordingSleep()
    url = artifact_server.add(
        "m.onnx", Artifact(BODY, status=status, status_times=2, retry_after=retry_after)
    )
    assert await fetch_into(downloader(artifact_pki, sleep), store, url) is None
    assert sleep.delays == [at_least, at_least]
    assert len(artifact_server.requests) == 3


async def test_persistent_503_gives_up_after_the_retry_budget(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    sleep = RecordingSleep()
    url = artifact_server.add("m.onnx", Artifact(BODY, status=503))
    error = await fetch_into(downloader(artifact_pki, sleep, max_retries=3), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, "http_503")
    assert len(artifact_server.requests) == 4
    assert len(sleep.delays) == 3


async def test_a_retry_that_would_pass_the_deadline_is_not_attempted(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    sleep = RecordingSleep()
    url = artifact_server.add("m.onnx", Artifact(BODY, status=429, retry_after="120"))
    error = await fetch_into(downloader(artifact_pki, sleep, deadline_s=60), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.TIMEOUT, "deadline")
    assert sleep.delays == []


class _CountingSink:
    """Wraps a store part file and counts the bytes the downloader wrote."""

    def __init__(self, store: ModelStore) -> None:
        self.inner = store.artifact_part(SHA)
        self.written = 0

    def open(self, *, append: bool) -> Any:
        f = self.inner.open(append=append)
        outer = self

        class _Counted:
            def write(self, data: bytes, /) -> int:
                outer.written += len(data)
                return f.write(data)

            flush, fileno, close = f.flush, f.fileno, f.close

        return _Counted()

    def remove(self) -> None:
        self.inner.remove()


async def test_body_longer_than_size_is_aborted_at_size_plus_one(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A body longer than the manifest says, chunked (no length up front): reading stops at
    size + 1; temp removed."""
    url = artifact_server.add("m.onnx", Artifact(BODY, extra=b"x" * 1_000_000, send_length=False))
    sink = _CountingSink(store)
    with pytest.raises(DeliveryError) as info:
        await downloader(artifact_pki).fetch(url, sha256=SHA, size=len(BODY), part=sink)
    assert (info.value.reason, info.value.detail) == (Reason.SIZE_MISMATCH, "too_long")
    assert sink.written <= len(BODY)
    assert not sink.inner.path.exists()
    assert len(artifact_server.requests) == 1


async def test_announced_length_longer_than_size_is_refused_before_reading(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    url = artifact_server.add("m.onnx", Artifact(BODY, extra=b"x"))
    error = await fetch_into(downloader(artifact_pki), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.SIZE_MISMATCH, "content_length")


@pytest.mark.parametrize(
    ("artifact", "reason"),
    [
        (
            Artifact(BODY, truncate_to=len(BODY) - 1, send_length=False),
            Reason.SIZE_MISMATCH,
        ),
        (Artifact(BODY, truncate_to=1000), Reason.SIZE_MISMATCH),
        (Artifact(BODY, flip_at=123_456), Reason.HASH_MISMATCH),
    ],
    ids=["truncated-chunked", "truncated-with-length", "flipped-byte"],
)
async def test_truncated_or_flipped_body_is_not_committed(
    artifact_server: ArtifactServer,
    artifact_pki: TestPki,
    store: ModelStore,
    artifact: Artifact,
    reason: Reason,
) -> None:
    """Wrong bytes: size_mismatch / hash_mismatch, nothing under models/, not retried."""
    sleep = RecordingSleep()
    url = artifact_server.add("m.onnx", artifact)
    error = await fetch_into(downloader(artifact_pki, sleep), store, url)
    assert error is not None
    assert error.reason is reason
    assert list(store.models_dir.iterdir()) == []
    assert sleep.delays == []


async def test_disk_full_during_download_keeps_old_state(
    artifact_server: ArtifactServer, artifact_pki: TestPki, tmp_path: Path
) -> None:
    """A full disk: ENOSPC from the file system: `disk_full`, temp removed, state.json intact."""
    root = tmp_path / "vol"
    before = ModelStore(root)
    before.open()
    before.save(StoreState().activated("m", ModelRef(1, "a" * 64)))
    state_bytes = (root / "state.json").read_bytes()
    store = ModelStore(root, opener=FullDisk(budget=50_000))
    store.open()
    url = artifact_server.add("m.onnx", Artifact(BODY))
    error = await fetch_into(downloader(artifact_pki), store, url)
    assert error is not None
    assert error.reason is Reason.DISK_FULL
    assert list(store.models_dir.iterdir()) == []
    assert (root / "state.json").read_bytes() == state_bytes
    assert len(artifact_server.requests) == 1  # a full disk is not retried


async def test_redirect_to_an_allowed_host_is_followed(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    artifact_server.add("real.onnx", Artifact(BODY))
    target = artifact_server.url("real.onnx", host="localhost")
    url = artifact_server.add("m.onnx", Artifact(b"", redirect_to=target))
    assert await fetch_into(downloader(artifact_pki), store, url) is None
    assert [r.path for r in artifact_server.requests] == ["/m.onnx", "/real.onnx"]


@pytest.mark.parametrize(
    ("location", "detail"),
    [
        ("https://evil.example/m.onnx", "host"),
        ("http://localhost/m.onnx", "scheme"),
        ("https://169.254.169.254/m.onnx", "address"),
        ("file:///etc/passwd", "syntax"),
    ],
)
async def test_redirect_to_a_disallowed_url_is_rejected(
    artifact_server: ArtifactServer,
    artifact_pki: TestPki,
    store: ModelStore,
    location: str,
    detail: str,
) -> None:
    """Every hop is checked: the redirect itself is never followed."""
    url = artifact_server.add("m.onnx", Artifact(b"", redirect_to=location))
    error = await fetch_into(
        downloader(artifact_pki, allowed_hosts=("127.0.0.1", "localhost", "169.254.169.254")),
        store,
        url,
    )
    assert error is not None
    assert (error.reason, error.detail) == (Reason.URL_REJECTED, detail)
    assert len(artifact_server.requests) == 1


async def test_redirect_loop_is_bounded(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    url = artifact_server.add("m.onnx", Artifact(b"", redirect_to="/m.onnx?again"))
    error = await fetch_into(downloader(artifact_pki, max_redirects=5), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, "too_many_redirects")
    assert len(artifact_server.requests) == 6


async def test_a_rejected_url_makes_no_request(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """URL policy end to end: the server on 127.0.0.1 is not allow-listed, so nothing connects."""
    url = artifact_server.add("m.onnx", Artifact(BODY))
    error = await fetch_into(downloader(artifact_pki, allowed_hosts=("localhost",)), store, url)
    assert error is not None
    assert error.reason is Reason.URL_REJECTED
    assert artifact_server.requests == []


async def test_allow_listed_name_is_resolved_and_fetched(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    artifact_server.add("m.onnx", Artifact(BODY))
    dns = FakeDns({"artifacts.test": "127.0.0.1"})
    url = artifact_server.url("m.onnx", host="artifacts.test")
    d = downloader(artifact_pki, dns=dns, allowed_hosts=("artifacts.test",))
    assert await fetch_into(d, store, url) is None


@pytest.mark.parametrize("address", ["169.254.169.254", "fe80::1", "0.0.0.0", "224.0.0.251"])
async def test_allow_listed_name_resolving_to_a_forbidden_address_is_rejected(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore, address: str
) -> None:
    """DNS cannot steer an allow-listed name to the metadata service; no retry either."""
    sleep = RecordingSleep()
    dns = FakeDns({"artifacts.test": address})
    url = artifact_server.url("m.onnx", host="artifacts.test")
    d = downloader(artifact_pki, sleep, dns=dns, allowed_hosts=("artifacts.test",))
    error = await fetch_into(d, store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.URL_REJECTED, "address")
    assert sleep.delays == []


async def test_self_signed_certificate_is_rejected(
    self_signed_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """TLS failures are `fetch_failed` with a `tls` detail, and are not retried."""
    sleep = RecordingSleep()
    url = self_signed_server.add("m.onnx", Artifact(BODY))
    error = await fetch_into(downloader(artifact_pki, sleep), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, "tls")
    assert self_signed_server.requests == []
    assert sleep.delays == []


async def test_expired_certificate_is_rejected(
    expired_cert_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A certificate signed by the trusted CA, but expired."""
    url = expired_cert_server.add("m.onnx", Artifact(BODY))
    error = await fetch_into(downloader(artifact_pki), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, "tls")
    assert expired_cert_server.requests == []


async def test_default_trust_store_rejects_the_test_ca(
    artifact_server: ArtifactServer, store: ModelStore
) -> None:
    """Without the injected context the system trust store applies (the production path)."""
    url = artifact_server.add("m.onnx", Artifact(BODY))
    d = Downloader(DownloadPolicy(allowed_hosts=("127.0.0.1",)), sleep=RecordingSleep())
    error = await fetch_into(d, store, url)
    assert error is not None
    assert error.detail == "tls"


async def test_cancellation_removes_the_temp_file_and_propagates(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    """A newer manifest supersedes the download: CancelledError, no half file left."""
    url = artifact_server.add("m.onnx", Artifact(BODY, stall_interval_s=0.01))
    sink = _CountingSink(store)
    task = asyncio.create_task(
        downloader(artifact_pki, min_bytes_per_s=0).fetch(
            url, sha256=SHA, size=len(BODY), part=sink
        )
    )
    for _ in range(200):
        await asyncio.sleep(0.01)
        if sink.written > 0:
            break
    assert sink.inner.path.exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not sink.inner.path.exists()


async def test_a_link_that_keeps_dropping_spends_the_retry_budget(
    artifact_server: ArtifactServer, artifact_pki: TestPki, store: ModelStore
) -> None:
    sleep = RecordingSleep()
    url = artifact_server.add(
        "m.onnx", Artifact(BODY, reset_at=0.6, reset_times=100, etag=None, last_modified=None)
    )
    error = await fetch_into(downloader(artifact_pki, sleep, max_retries=2), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, "connection")
    assert len(artifact_server.requests) == 3
    assert len(sleep.delays) == 2


async def test_connection_refused_is_retried_then_fetch_failed(
    artifact_pki: TestPki, store: ModelStore
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        port = unused.getsockname()[1]
        sleep = RecordingSleep()
        url = f"https://127.0.0.1:{port}/m.onnx"
        error = await fetch_into(downloader(artifact_pki, sleep, max_retries=2), store, url)
    assert error is not None
    assert (error.reason, error.detail) == (Reason.FETCH_FAILED, "connection")
    assert len(sleep.delays) == 2

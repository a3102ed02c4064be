"""A burst of connections beyond the open-file limit against a real `python -m agent serve`
started with a device's RLIMIT_NOFILE: the process keeps descriptors to spare, health answers
throughout, stderr stays JSON, and inference works afterwards."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from agent.serving.connections import (
    ACCEPT_LOG_EVERY_S,
    FD_RESERVE_MIN,
    MAX_CAP,
    AcceptErrors,
    ConnectionGuard,
    Listener,
    fd_budget,
)
from tests.support.agent_process import AgentProcess, running_agent
from tests.support.clock import FakeClock
from tests.support.models import TINY_FEATURES, tiny_bytes

BURST_FACTOR = 1.2
HEALTH_PERIOD_S = 0.05
HEALTH = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("limit", [256, 1024, 4096, 1 << 20])
@pytest.mark.parametrize("configured", [None, 100])
def test_the_budget_never_exceeds_the_limit(limit: int, configured: int | None) -> None:
    budget = fd_budget(limit, configured)
    assert budget.reserve + budget.api + budget.health + budget.metrics <= limit
    assert budget.reserve >= max(FD_RESERVE_MIN, limit // 8)
    assert budget.health >= 1
    assert 1 <= budget.api <= (configured or MAX_CAP)


class _FullTable(socket.socket):
    """A listening socket whose accept fails as a full descriptor table makes it fail."""

    def accept(self) -> tuple[socket.socket, object]:
        raise OSError(errno.EMFILE, "Too many open files")


async def test_accept_errors_are_counted_and_logged_as_one_rate_limited_event() -> None:
    registry = CollectorRegistry()
    clock = FakeClock()
    errors = AcceptErrors(registry, clock=clock)
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context))
    sock = _FullTable(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    listener = Listener(
        "http",
        sock,
        asyncio.Protocol,
        ConnectionGuard(10),
        ssl_context=None,
        idle_s=1.0,
        accept_errors=errors,
    )
    with capture_logs() as logs:
        listener.start()
        with socket.create_connection(sock.getsockname(), timeout=1):
            await asyncio.sleep(0.3)  # a few retries, ACCEPT_RETRY_S apart
            clock.sleep(ACCEPT_LOG_EVERY_S)
            await asyncio.sleep(0.1)
        await listener.close()
    count = registry.get_sample_value(
        "agent_http_accept_errors_total", {"service": "http", "error": "EMFILE"}
    )
    assert count is not None
    assert count >= 3
    events = [e for e in logs if e["event"] == "http_accept_failed"]
    assert len(events) == 2  # one at once, one after the quiet period, standing for the rest
    assert events[0]["count"] == 1
    assert sum(e["count"] for e in events) <= count
    assert events[1]["error"] == "EMFILE"
    assert not loop_errors  # nothing reached asyncio's handler (its traceback on stderr)


class Sampler(threading.Thread):
    """Counts the agent's open descriptors (/proc/PID/fd) every few milliseconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._fd_dir = Path(f"/proc/{pid}/fd")
        self.peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.005):
            try:
                self.peak = max(self.peak, len(os.listdir(self._fd_dir)))
            except FileNotFoundError:  # the process is gone; the test reports that
                return


class HealthProbe(threading.Thread):
    """A fresh connection asking for liveness every `HEALTH_PERIOD_S`, as a probe does."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(HEALTH_PERIOD_S):
            started = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as probe:
                    probe.sendall(HEALTH)
                    answer = probe.recv(64)
            except OSError as error:
                self.failures.append(repr(error))
                continue
            self.latencies.append(time.perf_counter() - started)
            if not answer.startswith(b"HTTP/1.1 200"):
                self.failures.append(repr(answer[:40]))


@contextmanager
def _watching(agent: AgentProcess) -> Iterator[tuple[Sampler, HealthProbe]]:
    sampler, probe = Sampler(agent.process.pid), HealthProbe(agent.ports["http"])
    sampler.start()
    probe.start()
    time.sleep(0.2)  # a few probes before the burst
    try:
        yield sampler, probe
    finally:
        probe.stopping.set()
        sampler.stopping.set()
        probe.join(5)
        sampler.join(5)


def _burst(port: int, count: int, deadline_s: float) -> list[socket.socket]:
    """Up to `count` connections opened as fast as they go, within `deadline_s`."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:  # the backlog is full: the kernel dropped the SYN
            continue
    return held


def _infer(agent: AgentProcess) -> int:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, TINY_FEATURES]}]}
    body["inputs"][0]["data"] = [0.5] * TINY_FEATURES
    request = urllib.request.Request(
        f"{agent.http_url}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


@pytest.mark.e2e
@pytest.mark.parametrize("limit", [256, 1024])
def test_a_burst_beyond_the_open_file_limit_keeps_descriptors_and_health(
    tmp_path: Path, limit: int
) -> None:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_bytes(0))
    env = {"EDGEML_KEEPALIVE_TIMEOUT_S": "5"}
    with running_agent(model, "--name", "m", env=env, open_file_limit=limit) as agent:
        port = agent.ports["http"]
        at_rest = len(os.listdir(f"/proc/{agent.process.pid}/fd"))
        with _watching(agent) as (sampler, probe):
            held = _burst(port, int(limit * BURST_FACTOR), deadline_s=10)
            time.sleep(0.5)
            for conn in held[::2]:  # some leave
                conn.close()
            held = held[1::2] + _burst(port, limit // 4, deadline_s=5)  # more arrive
            time.sleep(0.5)
            for conn in held:
                conn.close()
            time.sleep(0.3)
        assert agent.process.poll() is None
        assert _infer(agent) == 200
    ms = sorted(x * 1000 for x in probe.latencies)
    print(
        f"limit {limit}: fds at rest {at_rest}, peak {sampler.peak};"
        f" health probes {len(ms)}, median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"
    )
    assert sampler.peak < limit
    assert not probe.failures, probe.failures[:5]
    assert len(ms) >= 10
    unparsed = [line["text"] for line in agent.log_lines if line.get("event") == "unparsed"]
    assert not [text for text in unparsed if "Too many open files" in str(text)]
    assert not unparsed, unparsed[:5]  # stderr is JSON lines only
    assert not agent.events("http_accept_failed")

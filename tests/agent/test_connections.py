"""Hostile clients: idle floods, slow bodies and garbage requests against a real
`python -m agent serve`, while a normal client keeps being answered."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest

from agent.serving.connections import FD_RESERVE, MAX_CAP, ConnectionGuard, connection_cap
from tests.support.agent_process import AgentProcess, running_agent
from tests.support.models import TINY_FEATURES, tiny_bytes

CAP = 200
KEEPALIVE_S = 3.0
BODY_TIMEOUT_S = 2.0


@pytest.mark.parametrize(
    ("limit", "configured", "expected"),
    [
        (1024, None, 1024 - FD_RESERVE),  # the usual soft limit: below it
        (1 << 20, None, MAX_CAP),
        (1 << 20, 100, 100),
        (1024, 5000, 1024 - FD_RESERVE),  # a setting cannot exceed the descriptors
        (10, None, 1),
    ],
)
def test_connection_cap(limit: int, configured: int | None, expected: int) -> None:
    assert connection_cap(limit, configured) == expected


def test_the_guard_admits_up_to_its_cap_and_counts_refusals() -> None:
    refused: list[int] = []
    guard = ConnectionGuard(2, lambda: refused.append(1))
    assert [guard.admit() for _ in range(3)] == [True, True, False]
    guard.release()
    assert guard.admit()
    assert (guard.open, guard.refused, len(refused)) == (2, 1, 1)


# --- against the real process --------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    path.write_bytes(tiny_bytes(0))
    env = {
        "EDGEML_MAX_CONNECTIONS": str(CAP),
        "EDGEML_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
        "EDGEML_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    with running_agent(path, "--name", "m", env=env) as process:
        yield process


def _port(agent: AgentProcess) -> int:
    return agent.ports["http"]


def _rejections(agent: AgentProcess, reason: str) -> float:
    with urllib.request.urlopen(agent.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'agent_inference_rejections_total{{reason="{reason}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


TENSOR = {"name": "input", "datatype": "FP32", "shape": [1, TINY_FEATURES]}
BODY = json.dumps({"inputs": [{**TENSOR, "data": [0.5] * TINY_FEATURES}]}).encode()


class NormalClient(threading.Thread):
    """One keep-alive client on its own thread (the flood's event loop cannot delay it),
    sending a request every `period_s` and timing each answer."""

    def __init__(self, port: int, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.period_s = period_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        headers = {"Content-Type": "application/json"}
        try:
            while not self.stopping.is_set():
                started = time.perf_counter()
                try:
                    connection.request("POST", "/v2/models/m/infer", BODY, headers)
                    response = connection.getresponse()
                    response.read()
                    if response.status != 200:
                        self.failures.append(f"status {response.status}")
                except (OSError, http.client.HTTPException) as error:
                    self.failures.append(repr(error))
                    connection.close()
                self.latencies.append(time.perf_counter() - started)
                time.sleep(self.period_s)
        finally:
            connection.close()

    def __enter__(self) -> NormalClient:
        self.start()
        time.sleep(0.3)  # its connection is open before the hostile one arrives
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.join(10)

    def summary(self) -> dict[str, float]:
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "n": len(ms),
            "median_ms": round(statistics.median(ms), 2),
            "max_ms": round(ms[-1], 2),
        }


async def _open_idle(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


@pytest.mark.e2e
async def test_an_idle_flood_beyond_the_cap_is_refused_cleanly_and_a_client_keeps_its_answers(
    agent: AgentProcess,
) -> None:
    port = _port(agent)
    with NormalClient(port) as client:
        await _flood(agent, port)
    summary = client.summary()
    print("normal client during the flood:", summary)
    assert not client.failures, client.failures[:5]
    # The yardstick is 100 ms; the bound here only catches a server that stalled.
    assert summary["max_ms"] < 1000


async def _flood(agent: AgentProcess, port: int) -> None:
    refused_before = _rejections(agent, "too_many_connections")
    flood = await _open_idle(port, CAP + 100)
    # Beyond the cap a new connection is answered 503 and closed, at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
    writer.close()
    assert _rejections(agent, "too_many_connections") - refused_before >= 100
    # The idle ones are closed by the keep-alive timeout; the client never noticed.
    await asyncio.sleep(KEEPALIVE_S + 1.5)
    closed = 0
    for reader, writer in flood:
        try:
            # Refused ones got their 503 first; admitted idle ones are closed without a word.
            data = await asyncio.wait_for(reader.read(), 2)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            data = b"?"
        closed += data == b""
        writer.close()
    assert closed >= CAP - 5
    # New connections work again.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v2/health/live") as response,
    ):
        assert response.status == 200


@pytest.mark.e2e
async def test_a_slow_loris_body_gets_408_and_the_connection_closes(agent: AgentProcess) -> None:
    port = _port(agent)
    before = _rejections(agent, "body_timeout")
    with NormalClient(port) as client:
        answer, elapsed, reader, writer = await _slow_body(port)
    assert _rejections(agent, "body_timeout") == before + 1
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert elapsed < BODY_TIMEOUT_S + 3
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    writer.close()
    assert not client.failures, client.failures[:5]
    print("normal client during the slow body:", client.summary())


async def _slow_body(
    port: int,
) -> tuple[bytes, float, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    started = time.monotonic()
    answer = b""
    while not answer and time.monotonic() - started < BODY_TIMEOUT_S + 10:
        writer.write(b" ")  # one byte every 0.5 s
        try:
            answer = await asyncio.wait_for(reader.read(4096), 0.5)
        except TimeoutError:
            continue
    return answer, time.monotonic() - started, reader, writer


@pytest.mark.e2e
@pytest.mark.parametrize(
    "request_line",
    [b"FOO\x01 / HTTP/1.1", b"GET /v2 HTTP/9.9", b"\x16\x03\x01\x02\x00 TLS hello"],
)
async def test_requests_refused_before_routing_are_counted(
    agent: AgentProcess, request_line: bytes
) -> None:
    before = _rejections(agent, "malformed_http")
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(agent))
    writer.write(request_line + b"\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer[:100]
    assert _rejections(agent, "malformed_http") == before + 1
    assert not agent.events("Error handling request")

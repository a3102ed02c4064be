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
from typing import Any, cast

import aiohttp
import pytest

from agent.serving.connections import Admission, ConnectionGuard
from agent.serving.refusals import Refusal, check_request_line, encode_refusal
from tests.support.agent_process import AgentProcess, running_agent
from tests.support.models import TINY_FEATURES, tiny_bytes

CAP = 200
KEEPALIVE_S = 3.0
BODY_TIMEOUT_S = 2.0


def test_the_guard_admits_up_to_its_cap_then_its_health_reserve_and_counts_refusals() -> None:
    busy: list[int] = []
    guard = ConnectionGuard(2, 1, on_busy=lambda: busy.append(1))
    admitted = [guard.admit() for _ in range(4)]
    assert admitted == [Admission.FULL, Admission.FULL, Admission.HEALTH, None]
    guard.release(Admission.FULL)
    assert guard.admit() is Admission.FULL
    guard.release(Admission.HEALTH)
    assert guard.admit() is Admission.HEALTH
    assert (guard.open, guard.in_reserve, guard.refused, len(busy)) == (2, 1, 1, 1)


class _Waiting:
    """A reserve connection as the guard sees it: evictable unless its bytes are in."""

    def __init__(self, guard: ConnectionGuard, *, unread: bool) -> None:
        self.guard, self._unread, self.evicted = guard, unread, False

    def unread(self) -> bool:
        return self._unread

    def evict(self) -> None:
        self.evicted = True
        self.guard.waiting.pop(cast(Any, self), None)
        self.guard.release(Admission.HEALTH)


@pytest.mark.parametrize(("unread", "admitted"), [(False, Admission.HEALTH), (True, None)])
def test_a_full_reserve_gives_the_slot_of_a_silent_connection_to_the_next(
    unread: bool, admitted: Admission | None
) -> None:
    guard = ConnectionGuard(1, 1)
    assert [guard.admit(), guard.admit()] == [Admission.FULL, Admission.HEALTH]
    waiting = _Waiting(guard, unread=unread)
    guard.waiting[cast(Any, waiting)] = None
    # A silent one makes room; one whose request line has arrived (a probe) is kept.
    assert guard.admit() is admitted
    assert waiting.evicted is not unread
    assert guard.in_reserve == 1


_MALFORMED = Refusal(400, "malformed request line: expected METHOD TARGET HTTP/1.1", True)
_BUSY = Refusal(503, "too many connections; retry", False)


@pytest.mark.parametrize(
    ("line", "health_only", "expected"),
    [
        (b"GET /v2 HTTP/1.1", False, None),
        (b"POST /v2/models/m/infer HTTP/1.0", False, None),
        (b"GET /", False, _MALFORMED),  # HTTP/0.9
        (b"GET  / HTTP/1.1", False, _MALFORMED),
        (b"", False, _MALFORMED),
        (b"GET / HTTP/1", False, Refusal(400, "malformed HTTP version in the request line", True)),
        (b"GET / HTTP/2.0", False, Refusal(505, "HTTP version not supported: use HTTP/1.1", True)),
        (b"PRI * HTTP/2.0", False, Refusal(505, "HTTP version not supported: use HTTP/1.1", True)),
        (b"GET /v2/health/live HTTP/1.1", True, None),
        (b"HEAD /v2/health/ready?x=1 HTTP/1.1", True, None),
        (b"GET http://device:8000/v2/health/live HTTP/1.1", True, None),
        (b"GET /v2/models/m HTTP/1.1", True, _BUSY),
        (b"POST /v2/health/live HTTP/1.1", True, _BUSY),
        (b"GET http://device:8000 HTTP/1.1", True, _BUSY),
    ],
)
def test_check_request_line(line: bytes, health_only: bool, expected: Refusal | None) -> None:
    assert check_request_line(line, health_only=health_only) == expected


def test_a_refusal_is_a_complete_json_answer_that_closes() -> None:
    head, _, body = encode_refusal(_BUSY).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"error": "too many connections; retry"}


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


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _flood(agent: AgentProcess, port: int) -> None:
    refused_before = _rejections(agent, "too_many_connections")
    flood = await _open_idle(port, CAP + 100)
    # Beyond the cap a request other than health gets 503 and the connection closes, at once;
    # health is still answered (the health reserve).
    answer = await _ask(port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
    answer = await _ask(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert _rejections(agent, "too_many_connections") - refused_before >= 50
    # The idle ones are closed by the keep-alive timeout; the client never noticed.
    await asyncio.sleep(KEEPALIVE_S + 1.5)
    closed = 0
    for reader, writer in flood:
        try:
            # Dropped ones are closed at once; admitted idle ones close without a word.
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
    ("request_line", "status"),
    [
        (b"FOO\x01 / HTTP/1.1", 400),
        (b"GET /v2 HTTP/9.9", 505),
        (b"\x16\x03\x01\x02\x00 TLS hello", 400),
    ],
)
async def test_requests_refused_before_routing_are_counted(
    agent: AgentProcess, request_line: bytes, status: int
) -> None:
    before = _rejections(agent, "malformed_http")
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(agent))
    writer.write(request_line + b"\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith((b"HTTP/1.1 %d" % status, b"HTTP/1.0 %d" % status)), answer[:100]
    assert _rejections(agent, "malformed_http") == before + 1
    assert not agent.events("Error handling request")


# Well under the idle timeout (KEEPALIVE_S): an odd request is answered, not left to time out.
ANSWER_WITHIN_S = 1.5
_HOST = b"Host: x\r\n"
ODD_REQUESTS = [
    pytest.param(b"GET /\r\n", 400, None, id="http-0.9-no-version"),
    pytest.param(b"GET /\r\n\r\n", 400, None, id="http-0.9-blank-line"),
    pytest.param(b"get /v2 HTTP/1.1\r\n" + _HOST + b"\r\n", 400, None, id="lowercase-method"),
    pytest.param(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        405,
        "GET, HEAD, POST",
        id="connect",
    ),
    pytest.param(b"TRACE /v2 HTTP/1.1\r\n" + _HOST + b"\r\n", 405, "GET, HEAD, POST", id="trace"),
    pytest.param(b"TRACE /nope HTTP/1.1\r\n" + _HOST + b"\r\n", 405, None, id="trace-unknown"),
    pytest.param(b"OPTIONS /v2 HTTP/1.1\r\n" + _HOST + b"\r\n", 405, "GET,HEAD", id="options"),
    pytest.param(b"OPTIONS /nope HTTP/1.1\r\n" + _HOST + b"\r\n", 404, None, id="options-unknown"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\n" + _HOST + b"\r\n", 404, None, id="options-star"),
    pytest.param(
        b"GET http://x/v2/health/live HTTP/1.1\r\n" + _HOST + b"\r\n", 200, None, id="absolute"
    ),
    pytest.param(b"GET /v2/health/live HTTP/1.0\r\n\r\n", 200, None, id="http-1.0"),
    pytest.param(b"GET /v2 HTTP/2.0\r\n" + _HOST + b"\r\n", 505, None, id="http-2-cleartext"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, None, id="h2c-preface"),
    pytest.param(b"GET /v2 HTTP/1.1.1\r\n" + _HOST + b"\r\n", 400, None, id="bad-version"),
    pytest.param(
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + _HOST + b"\r\n", 414, None, id="huge-line"
    ),
    pytest.param(b"GET /" + b"a" * 20_000, 414, None, id="huge-line-unfinished"),
    pytest.param(
        b"GET /v2 HTTP/1.1\r\n" + _HOST + b"X: " + b"a" * 10_000_000 + b"\r\n\r\n",
        431,
        None,
        id="10-MB-header",
    ),
    pytest.param(
        b"GET /v2 HTTP/1.1\r\n" + _HOST + b"X: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        None,
        id="long-header",
    ),
    pytest.param(
        b"GET /v2 HTTP/1.1\r\n" + _HOST + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n",
        431,
        None,
        id="many-headers",
    ),
]


@pytest.mark.e2e
@pytest.mark.parametrize(("request_bytes", "status", "allow"), ODD_REQUESTS)
async def test_odd_requests_get_their_status_at_once(
    agent: AgentProcess, request_bytes: bytes, status: int, allow: str | None
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(agent))
    started = time.monotonic()
    writer.write(request_bytes)
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_WITHIN_S)
    finally:
        elapsed = time.monotonic() - started
        writer.close()
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.split(" ")[1] == str(status), status_line
    assert elapsed < ANSWER_WITHIN_S
    headers = dict(line.split(": ", 1) for line in header_lines if line)
    if allow is not None:
        assert headers["Allow"] == allow
    if status >= 400:
        assert headers["Content-Type"].startswith("application/json")

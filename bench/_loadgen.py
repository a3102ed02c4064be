"""Closed-loop HTTP load: N clients, each sends one v2 infer request and awaits its answer.

Every client holds one keep-alive connection (one `ClientSession`, a connector limited to N),
so the server sees N concurrent connections, none opened during the measured window. All
clients run through a warm-up first; the window then counts only requests that started inside
it and finished before it closed, and only answers that are 200 with the expected output shape.
CPU clocks given by the caller (this process, the server, the whole machine) are read at the
window's edges, so a client-bound run, or one disturbed by other work on the machine, shows in
the result instead of passing for a server limit.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import numpy as np

# Raised by aiohttp and asyncio when a connection or answer fails; anything else is a bug here.
_CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class LoadSpec:
    url: str
    body: bytes
    output_shape: tuple[int, ...]
    clients: int = 32
    warmup_s: float = 2.0
    duration_s: float = 10.0
    timeout_s: float = 30.0


@dataclass
class LoadResult:
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict[str, float | int]:
        latencies = np.asarray(self.latencies_s) * 1000
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies.size else (np.nan, np.nan)
        return {
            "rps": round(self.ok / self.duration_s, 1),
            "p50_ms": round(float(p50), 3),
            "p99_ms": round(float(p99), 3),
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            # Cores busy during the window, per clock: 1.0 is one core fully used.
            **{f"{name}_cores": round(s / self.duration_s, 2) for name, s in self.cpu_s.items()},
        }


def check_answer(status: int, body: bytes, output_shape: tuple[int, ...]) -> str | None:
    """None for a good answer, else the error kind (a bounded set of strings)."""
    if status != 200:
        return f"http_{status}"
    outputs = json.loads(body)["outputs"]
    expected = int(np.prod(output_shape))
    if tuple(outputs[0]["shape"]) != output_shape or len(outputs[0]["data"]) != expected:
        return "wrong_shape"
    return None


async def run_load(spec: LoadSpec, cpu_clocks: Mapping[str, Callable[[], float]]) -> LoadResult:
    """Warm up, then measure for `spec.duration_s`; each clock reads CPU seconds of something."""
    connector = aiohttp.TCPConnector(limit=spec.clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    headers = {"Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_open = start + spec.warmup_s
    window_close = window_open + spec.duration_s
    result = LoadResult(duration_s=spec.duration_s)
    marks: dict[str, float] = {}

    async def client(session: aiohttp.ClientSession) -> None:
        while (sent := loop.time()) < window_close:
            try:
                async with session.post(spec.url, data=spec.body, headers=headers) as response:
                    body = await response.read()
                    done = loop.time()
                    # Checked after the clock stops: the client's parsing is not server latency.
                    error = check_answer(response.status, body, spec.output_shape)
            except _CLIENT_ERRORS as exc:
                done, error = loop.time(), type(exc).__name__
            if sent < window_open or done > window_close:
                continue
            if error is None:
                result.latencies_s.append(done - sent)
            else:
                result.errors[error] += 1

    async def sample_cpu() -> None:
        # One timer task reads every clock at each edge, so all share the same window.
        await asyncio.sleep(window_open - loop.time())
        marks.update({name: clock() for name, clock in cpu_clocks.items()})
        await asyncio.sleep(window_close - loop.time())
        result.cpu_s = {name: clock() - marks[name] for name, clock in cpu_clocks.items()}

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(sample_cpu(), *(client(session) for _ in range(spec.clients)))
    return result

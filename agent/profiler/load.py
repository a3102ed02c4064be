"""Open-loop load generation against the child, and reading its answers and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

MAX_OUTSTANDING = 256  # open-loop requests in flight at once; beyond, a request counts as failed


@dataclass
class Window:
    """Answers to an offered load: latencies of the good ones, a count of the rest."""

    latencies_s: list[float] = field(default_factory=list)
    scheduled: list[float] = field(default_factory=list)  # loop time each request was due
    errors: int = 0

    def p99_ms(self, start: float, end: float) -> float | None:
        """p99 of the requests due in [start, end)."""
        return percentile_ms(
            [
                lat
                for lat, at in zip(self.latencies_s, self.scheduled, strict=True)
                if start <= at < end
            ],
            99,
        )


def http_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_OUTSTANDING),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def offer_load(
    session: aiohttp.ClientSession, url: str, body: bytes, rps: float, seconds: float
) -> Window:
    """Open loop: one request every 1/rps s for `seconds`; latency from each scheduled instant."""
    loop = asyncio.get_running_loop()
    window = Window()
    outstanding: set[asyncio.Task[None]] = set()
    headers = {"Content-Type": "application/json"}

    async def send(scheduled: float) -> None:
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            window.latencies_s.append(loop.time() - scheduled)
            window.scheduled.append(scheduled)
        else:
            window.errors += 1

    start = loop.time()
    for index in range(max(1, round(rps * seconds))):
        scheduled = start + index / rps
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(outstanding) >= MAX_OUTSTANDING:  # the server fell behind: a failure, not a wait
            window.errors += 1
            continue
        task = loop.create_task(send(scheduled))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.wait(outstanding)
    return window


async def batch_rows(session: aiohttp.ClientSession, metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the agent's rows-per-call histogram."""
    async with session.get(metrics_url) as response:
        text = await response.text()
    values = dict.fromkeys(("sum", "count"), 0.0)
    for line in text.splitlines():
        for kind in values:
            if line.startswith(f"agent_inference_batch_rows_{kind} "):
                values[kind] = float(line.split()[1])
    return values["sum"], values["count"]


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    if not latencies_s:
        return None
    return round(float(np.percentile(latencies_s, q)) * 1000, 3)

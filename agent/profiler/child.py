"""The agent under measurement: a fresh `python -m agent serve` child per configuration.

Its stderr (JSON log lines) tells the ports it listens on and each release's final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.observation.recommend import Knobs
from agent.observation.resources import PeakMemory
from agent.profiler.release import MODEL_NAME
from agent.releases.lifecycle import ModelState

FINAL_STATES = frozenset(
    {ModelState.ACTIVE, ModelState.FAILED, ModelState.REJECTED, ModelState.ROLLED_BACK}
)


@dataclass
class ChildLog:
    ports: dict[str, int] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False

    async def follow(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            text = raw.decode(errors="replace").rstrip()
            self.tail = [*self.tail[-19:], text]
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if line.get("event") == "http_listening":
                    self.ports[str(line["service"])] = int(line["port"])
                elif line.get("event") == "model_status":
                    self.statuses.append(line)
            self.changed.set()
        self.ended = True
        self.changed.set()

    async def wait(self, found: Callable[[], object], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not found():
            if self.ended:
                raise ChildError(f"the agent exited before {what}: {' | '.join(self.tail[-3:])}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"no {what} within {timeout_s:g} s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.changed.wait()

    def final(self, version: int) -> dict[str, Any] | None:
        for line in self.statuses:
            if line.get("version") == version and line.get("state") in FINAL_STATES:
                return line
        return None


class ChildError(Exception):
    """A configuration's child process failed; the sweep records why and goes on."""


@dataclass
class Child:
    process: asyncio.subprocess.Process
    log: ChildLog
    memory: PeakMemory
    url: str
    metrics_url: str

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def child_environment(knobs: Knobs, trusted_keys: str) -> dict[str, str]:
    # A stray EDGEML_* from the caller's shell would change the configuration measured.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    return env | {
        **knobs.environment(),
        "EDGEML_TRUSTED_KEYS": trusted_keys,
        "EDGEML_WATCH_DEBOUNCE_S": "0.05",
        "EDGEML_LOG_FORMAT": "json",
    }


@asynccontextmanager
async def running_child(
    scratch: Path, knobs: Knobs, trusted_keys: str, timeout_s: float
) -> AsyncIterator[Child]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "serve",
        "--state-dir", str(scratch / "state"), "--watch-dir", str(scratch / "releases"),
        "--host", "127.0.0.1", "--http-port", "0", "--metrics-port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=child_environment(knobs, trusted_keys),
    )  # fmt: skip
    assert process.stderr is not None
    log = ChildLog()
    follower = asyncio.get_running_loop().create_task(log.follow(process.stderr))
    try:
        await log.wait(lambda: {"http", "metrics"} <= log.ports.keys(), timeout_s, "HTTP port")
        http, metrics = log.ports["http"], log.ports["metrics"]
        yield Child(
            process,
            log,
            PeakMemory(process.pid),
            f"http://127.0.0.1:{http}/v2/models/{MODEL_NAME}/infer",
            f"http://127.0.0.1:{metrics}/metrics",
        )
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        await follower

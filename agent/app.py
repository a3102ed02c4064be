"""Process lifecycle: services start in order, run in one TaskGroup, stop in reverse.

SIGTERM or SIGINT stops intake first (the HTTP service is the last started, so first
stopped), lets in-flight work drain within one shared grace, then cancels what is left.
Docker sends SIGKILL 10 s after SIGTERM; the default grace of 8 s stays inside that.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)


class Service(Protocol):
    """One part of the agent with its own lifecycle: start -> run -> stop."""

    name: str

    async def start(self) -> None:
        """Acquire resources; return once the service is usable."""

    async def run(self) -> None:
        """The service's own work until cancelled; return at once if it has none."""

    async def stop(self, grace_s: float) -> None:
        """Stop taking work, finish what is in flight within `grace_s`, release resources."""


class App:
    def __init__(
        self,
        services: Sequence[Service],
        *,
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
        handle_signals: bool = True,
    ) -> None:
        self._services = list(services)
        self._grace_s = grace_s
        self._clock = clock
        self._handle_signals = handle_signals
        self._stop_requested = asyncio.Event()
        self.stop_reason: str | None = None
        self.failed = False
        # Called once, the moment a stop is requested: for work that must not start or finish
        # while intake drains (a model swap, say), before any service is stopped.
        self.on_stop_requested: list[Callable[[], None]] = []

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stop_requested", reason=reason)
            for hook in self.on_stop_requested:
                hook()
        self._stop_requested.set()

    def fail(self, reason: str) -> None:
        """Stop gracefully, then exit non-zero so the container runtime restarts the agent."""
        if self.stop_reason is None:
            self.failed = True
            log.error("agent_failing", reason=reason)
        self.request_stop(reason)

    async def run(self) -> None:
        """Run until a stop is requested (or a service fails, which is re-raised)."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if self._handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        started: list[Service] = []
        try:
            for service in self._services:
                await service.start()
                started.append(service)
                log.info("service_started", service=service.name)
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(s.run(), name=s.name) for s in started]
                # Waiting inside the group: a failing service cancels this wait and is re-raised.
                await self._stop_requested.wait()
                await self._stop(started)
                started = []
                for task in runs:
                    task.cancel("agent stopping")
        finally:
            if started:  # a service failed: still release the others, within the grace
                await self._stop(started)
            for signum in signals:
                loop.remove_signal_handler(signum)

    async def _stop(self, started: Sequence[Service]) -> None:
        deadline = self._clock() + self._grace_s
        for service in reversed(started):
            remaining = max(deadline - self._clock(), 0.0)
            try:
                async with asyncio.timeout(remaining + 0.5):
                    await service.stop(remaining)
            except TimeoutError:
                log.warning("service_stop_timed_out", service=service.name, grace_s=remaining)
            except Exception:
                log.exception("service_stop_failed", service=service.name)
            else:
                log.info("service_stopped", service=service.name)


async def idle_forever() -> None:
    """`Service.run` for services whose work is driven by callbacks (servers)."""
    await asyncio.Event().wait()

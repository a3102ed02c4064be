"""Measuring one configuration (loads, then a swap under load) and sweeping them all.

Per configuration, in its own child:

* each offered load (open loop: requests leave on a fixed schedule whatever the answers, and
  latency counts from the scheduled instant, so a stalled server cannot hide its queue) runs
  for a warm-up, then a measured window: p50/p99, achieved rate, failures, the child's CPU and
  its peak resident memory over the window;
* under the target load, the same model is released again as a higher version: the candidate
  loads beside the active one, then the old session drains and is dropped. The peak resident
  memory across that swap is what a memory limit must leave room for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp
import psutil

from agent.observation.recommend import ConfigRun, Knobs, LoadPoint, SwapPoint
from agent.profiler.child import Child, ChildError, running_child
from agent.profiler.load import Window, batch_rows, http_client, offer_load, percentile_ms
from agent.profiler.plan import SweepPlan
from agent.profiler.release import MANIFEST, Release
from agent.releases.lifecycle import ModelState


@dataclass
class Measurement:
    """One configuration's child, the HTTP client talking to it, and what to measure."""

    child: Child
    session: aiohttp.ClientSession
    release: Release
    plan: SweepPlan
    knobs: Knobs
    progress: TextIO

    def say(self, text: str) -> None:
        print(f"  {self.knobs.label()} {text}", file=self.progress, flush=True)

    async def publish(self, version: int) -> None:
        """Release `version` and wait until it serves (or fails: `ChildError`)."""
        folder, log = self.release.folder, self.child.log
        scratch = folder / f".{MANIFEST}.part"
        scratch.write_bytes(self.release.document(version))
        os.replace(scratch, folder / MANIFEST)  # the agent sees the manifest whole or not at all
        await log.wait(lambda: log.final(version), self.plan.startup_timeout_s, f"v{version}")
        final = log.final(version)
        assert final is not None
        if final.get("state") != ModelState.ACTIVE:
            state, message = final.get("state"), final.get("message")
            raise ChildError(f"release {version} ended {state}: {message}")

    async def run(self) -> ConfigRun:
        await self.publish(1)
        load_rss = self.child.memory.rss()
        points: list[LoadPoint] = []
        for rps in sorted(self.plan.loads_rps):
            point = await self.point(rps)
            points.append(point)
            self.say(
                f"at {rps:g}/s: achieved {point.achieved_rps:g}/s, p50 {point.p50_ms} ms, "
                f"p99 {point.p99_ms} ms, errors {point.errors}, cpu {point.cpu_cores:g} cores, "
                f"peak {point.peak_rss_bytes / 2**20:.1f} MiB"
            )
            if point.errors or point.achieved_rps < 0.5 * rps:
                break  # saturated: higher loads only queue longer
        swap = None
        if self.plan.swap_rps is not None:
            swap = await self.swap(self.plan.swap_rps)
            self.say(
                f"swap: {swap.seconds:.2f} s, peak {swap.peak_rss_bytes / 2**20:.1f} MiB "
                f"(+{swap.transient_bytes / 2**20:.1f} MiB over the RSS before), "
                f"p99 {swap.p99_ms} ms over {swap.window_s:g} s around it"
            )
        return ConfigRun(self.knobs, load_rss, tuple(points), swap)

    async def offer(self, rps: float, seconds: float) -> Window:
        return await offer_load(self.session, self.child.url, self.release.body, rps, seconds)

    async def point(self, rps: float) -> LoadPoint:
        child = self.child
        if self.plan.warmup_s:
            await self.offer(rps, self.plan.warmup_s)
        rows_before = await batch_rows(self.session, child.metrics_url)
        child.memory.reset()
        cpu_before, started = child.cpu_seconds(), time.monotonic()
        window = await self.offer(rps, self.plan.measure_s)
        # The schedule spans measure_s; answers arriving after it stretch the window.
        elapsed = max(time.monotonic() - started, self.plan.measure_s)
        cpu = child.cpu_seconds() - cpu_before
        peak = child.memory.peak()
        rows_after = await batch_rows(self.session, child.metrics_url)
        calls = rows_after[1] - rows_before[1]
        return LoadPoint(
            offered_rps=rps,
            achieved_rps=round(len(window.latencies_s) / elapsed, 1),
            p50_ms=percentile_ms(window.latencies_s, 50),
            p99_ms=percentile_ms(window.latencies_s, 99),
            errors=window.errors,
            cpu_cores=round(cpu / elapsed, 3),
            peak_rss_bytes=peak,
            batch_rows_mean=round((rows_after[0] - rows_before[0]) / calls, 2) if calls else None,
        )

    async def swap(self, rps: float) -> SwapPoint:
        """Release the model again a quarter into a window of load twice a measured one.

        The p99 of that window is what a window of its length with one swap shows; the peak
        covers the candidate loading beside the active model, then the old one's drain.
        """
        memory, window_s = self.child.memory, self.plan.measure_s * 2
        load = asyncio.get_running_loop().create_task(self.offer(rps, window_s))
        await asyncio.sleep(window_s / 4)
        memory.reset()
        before = memory.rss()
        started = time.monotonic()
        try:
            await self.publish(2)
        finally:
            seconds = time.monotonic() - started
            window = await load
        return SwapPoint(
            before,
            memory.peak(),
            memory.rss(),
            round(seconds, 3),
            p99_ms=percentile_ms(window.latencies_s, 99),
            window_s=window_s,
        )


async def profile_configuration(
    model: bytes, knobs: Knobs, plan: SweepPlan, scratch: Path, progress: TextIO
) -> ConfigRun:
    """One configuration in a fresh child process: loads, then one swap under load."""
    release = await asyncio.to_thread(Release.prepare, [model], scratch / "releases")
    try:
        async with (
            running_child(scratch, knobs, release.trusted_keys, plan.startup_timeout_s) as child,
            http_client() as session,
        ):
            sampler = asyncio.get_running_loop().create_task(child.memory.sample_forever())
            try:
                return await Measurement(child, session, release, plan, knobs, progress).run()
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
    except (ChildError, psutil.Error, aiohttp.ClientError, OSError) as error:
        print(f"  {knobs.label()}: failed: {error}", file=progress, flush=True)
        return ConfigRun(knobs, 0, (), None, error=str(error)[:300])


# -- the sweep and its report ------------------------------------------------------------


async def sweep(model: bytes, plan: SweepPlan, progress: TextIO) -> list[ConfigRun]:
    # SIGTERM cancels the sweep like Ctrl-C does, so the running child is stopped, not orphaned.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    if task is not None and threading.current_thread() is threading.main_thread():
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    runs = []
    for index, knobs in enumerate(plan.knobs, 1):
        print(f"[{index}/{len(plan.knobs)}] {knobs.label()}", file=progress, flush=True)
        with tempfile.TemporaryDirectory(prefix="agent-profile-") as scratch:
            runs.append(await profile_configuration(model, knobs, plan, Path(scratch), progress))
    return runs

"""Profiles of the running agent: inference counters, latency quantiles, CPU and memory.

A `Snapshot` is read off the metrics at one instant; the difference of two is a window
(`window_profile`, pure), which telemetry sends periodically and the `profile` direct method
takes over a few seconds on demand.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from agent.observation.metrics import InferenceMetrics


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    ok: int
    rejected: int
    failed: int
    latency_counts: tuple[int, ...]
    latency_sum: float
    batch_counts: tuple[int, ...]
    batch_sum: float
    cpu_seconds: float
    rss_bytes: int


def take_snapshot(
    metrics: InferenceMetrics,
    process: psutil.Process,
    clock: Callable[[], float] = time.monotonic,
) -> Snapshot:
    times = process.cpu_times()
    return Snapshot(
        at=clock(),
        ok=metrics.ok.value,
        rejected=metrics.rejected.value,
        failed=metrics.failed.value,
        latency_counts=tuple(metrics.total.counts),
        latency_sum=metrics.total.total,
        batch_counts=tuple(metrics.batch_rows.counts),
        batch_sum=metrics.batch_rows.total,
        cpu_seconds=times.user + times.system,
        rss_bytes=process.memory_info().rss,
    )


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """Estimate a quantile from histogram buckets (linear within the bucket, as PromQL does)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = bounds[index] if index < len(bounds) else bounds[-1]
            lower = bounds[index - 1] if index > 0 else 0.0
            if index >= len(bounds):  # the +Inf bucket: the best bound known is the last one
                return upper
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def window_profile(
    before: Snapshot, after: Snapshot, latency_bounds: Sequence[float]
) -> dict[str, float | int | None]:
    """What happened between two snapshots, in plain JSON numbers."""
    seconds = max(after.at - before.at, 1e-9)
    latency = [a - b for a, b in zip(after.latency_counts, before.latency_counts, strict=True)]
    batches = sum(a - b for a, b in zip(after.batch_counts, before.batch_counts, strict=True))
    answered = sum(latency)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "window_s": round(seconds, 3),
        "requests_ok": after.ok - before.ok,
        "requests_rejected": after.rejected - before.rejected,
        "requests_failed": after.failed - before.failed,
        "requests_per_s": round(answered / seconds, 2),
        "latency_mean_ms": ms((after.latency_sum - before.latency_sum) / answered)
        if answered
        else None,
        "latency_p50_ms": ms(quantile(latency_bounds, latency, 0.5)),
        "latency_p99_ms": ms(quantile(latency_bounds, latency, 0.99)),
        "batch_rows_mean": round((after.batch_sum - before.batch_sum) / batches, 2)
        if batches
        else None,
        "cpu_percent": round(100 * (after.cpu_seconds - before.cpu_seconds) / seconds, 1),
        "rss_mb": round(after.rss_bytes / 2**20, 1),
        "rss_change_mb": round((after.rss_bytes - before.rss_bytes) / 2**20, 1),
    }


async def live_profile(
    metrics: InferenceMetrics, seconds: float, process: psutil.Process | None = None
) -> dict[str, float | int | None]:
    """Profile the agent as it runs for `seconds` (the `profile` direct method)."""
    if not 0 < seconds <= 60 or math.isnan(seconds):
        raise ValueError(f"a profile lasts between 0 and 60 seconds, not {seconds}")
    process = process or psutil.Process()
    before = take_snapshot(metrics, process)
    await asyncio.sleep(seconds)
    return window_profile(before, take_snapshot(metrics, process), metrics.total.bounds)


@dataclass(frozen=True, slots=True)
class ModelCounters:
    """One served model's counters at an instant; `model` identifies the loaded model, so a
    window across a swap counts the new model only."""

    model: int
    served: int
    failed: int
    latency_counts: tuple[int, ...]


def model_health(
    before: ModelCounters | None,
    after: ModelCounters,
    window_s: float,
    latency_bounds: Sequence[float],
) -> dict[str, float | int | None]:
    """A model's health over one window (reported per model at telemetry cadence). Pure."""
    if before is None or before.model != after.model:
        before = ModelCounters(after.model, 0, 0, (0,) * len(after.latency_counts))
    requests = after.served - before.served
    failed = after.failed - before.failed
    latency = [a - b for a, b in zip(after.latency_counts, before.latency_counts, strict=True)]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "requests": requests,
        "error_rate": round(failed / requests, 4) if requests else 0.0,
        "p50_ms": ms(quantile(latency_bounds, latency, 0.5)),
        "p99_ms": ms(quantile(latency_bounds, latency, 0.99)),
        "window_s": round(window_s, 1),
    }

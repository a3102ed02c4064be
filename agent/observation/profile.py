"""Profiles of the running agent: inference counters, latency quantiles, CPU and memory.

A `Snapshot` is read off the metrics at one instant; the difference of two is a window
(`window_profile`, pure), which telemetry sends periodically and the `profile` direct method
takes over a few seconds on demand. `model_profiles` splits a window by served model.

CPU per inference comes from the process's CPU time, shared among models in proportion to
the ONNX Runtime time each took: the serving overhead (decoding, answering) is counted, and a
thread-CPU clock around every call is not paid on the hot path.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from agent.observation.limits import Limits
from agent.observation.metrics import InferenceMetrics, ModelStats
from agent.observation.resources import Resources, headroom_low, read_resources


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    latency_counts: tuple[int, ...]
    latency_sum: float
    batch_counts: tuple[int, ...]
    batch_sum: float
    compute_s: float
    load_rss_delta_bytes: int | None = None
    swap_transient_bytes: int | None = None

    @classmethod
    def of(cls, stats: ModelStats) -> ModelSnapshot:
        return cls(
            tuple(stats.total.counts),
            stats.total.total,
            tuple(stats.batch_rows.counts),
            stats.batch_rows.total,
            stats.compute_s,
            stats.load_rss_delta_bytes,
            stats.swap_transient_bytes,
        )


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
    models: Mapping[str, ModelSnapshot] = field(default_factory=dict)


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
        models={name: ModelSnapshot.of(stats) for name, stats in metrics.models.items()},
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

    return {
        "window_s": round(seconds, 3),
        "requests_ok": after.ok - before.ok,
        "requests_rejected": after.rejected - before.rejected,
        "requests_failed": after.failed - before.failed,
        "requests_per_s": round(answered / seconds, 2),
        "latency_mean_ms": _ms((after.latency_sum - before.latency_sum) / answered)
        if answered
        else None,
        "latency_p50_ms": _ms(quantile(latency_bounds, latency, 0.5)),
        "latency_p99_ms": _ms(quantile(latency_bounds, latency, 0.99)),
        "batch_rows_mean": round((after.batch_sum - before.batch_sum) / batches, 2)
        if batches
        else None,
        "cpu_percent": round(100 * (after.cpu_seconds - before.cpu_seconds) / seconds, 1),
        "rss_mb": round(after.rss_bytes / 2**20, 1),
        "rss_change_mb": round((after.rss_bytes - before.rss_bytes) / 2**20, 1),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def model_profiles(
    before: Snapshot, after: Snapshot, latency_bounds: Sequence[float]
) -> dict[str, dict[str, float | int | None]]:
    """Each served model's share of a window (models that appeared meanwhile start at zero)."""
    seconds = max(after.at - before.at, 1e-9)
    cpu_s = max(after.cpu_seconds - before.cpu_seconds, 0.0)
    compute = {
        name: now.compute_s - (before.models[name].compute_s if name in before.models else 0.0)
        for name, now in after.models.items()
    }
    all_compute = sum(compute.values())
    profiles: dict[str, dict[str, float | int | None]] = {}
    for name, now in sorted(after.models.items()):
        then = before.models.get(name)
        latency = [
            a - (then.latency_counts[i] if then else 0) for i, a in enumerate(now.latency_counts)
        ]
        calls = sum(
            a - (then.batch_counts[i] if then else 0) for i, a in enumerate(now.batch_counts)
        )
        answered = sum(latency)
        rows = now.batch_sum - (then.batch_sum if then else 0.0)
        share = cpu_s * compute[name] / all_compute if all_compute > 0 else 0.0
        profiles[name] = {
            "requests": answered,
            "requests_per_s": round(answered / seconds, 2),
            "latency_p50_ms": _ms(quantile(latency_bounds, latency, 0.5)),
            "latency_p99_ms": _ms(quantile(latency_bounds, latency, 0.99)),
            "batch_rows_mean": round(rows / calls, 2) if calls else None,
            "cpu_ms_per_inference": round(share / answered * 1000, 3) if answered else None,
            "load_rss_delta_mb": _mb(now.load_rss_delta_bytes),
            "swap_transient_mb": _mb(now.swap_transient_bytes),
        }
    return profiles


async def live_profile(
    metrics: InferenceMetrics,
    seconds: float,
    process: psutil.Process | None = None,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Profile the agent as it runs for `seconds` (the `profile` direct method): the window,
    each model's share of it, and (given `limits`) the resources against the limits."""
    if not 0 < seconds <= 60 or math.isnan(seconds):
        raise ValueError(f"a profile lasts between 0 and 60 seconds, not {seconds}")
    process = process or psutil.Process()
    before = take_snapshot(metrics, process)
    await asyncio.sleep(seconds)
    after = take_snapshot(metrics, process)
    bounds = metrics.total.bounds
    result: dict[str, Any] = {
        **window_profile(before, after, bounds),
        "models": model_profiles(before, after, bounds),
    }
    if limits is not None:
        result["resources"] = read_resources(process, limits).as_json()
        result["limits"] = limits.as_json()
    return result


# The reported `profile` stays small however many models serve: a twin's reported document
# is limited to 32 KB, shared with every other reported section.
MAX_REPORTED_MODELS = 16
REPORTED_MODEL_FIELDS = (
    "requests_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "batch_rows_mean",
    "cpu_ms_per_inference",
    "load_rss_delta_mb",
    "swap_transient_mb",
)


def reported_profile(
    window: Mapping[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    resources: Resources,
    *,
    at: str,
    gone: Iterable[str] = (),
) -> dict[str, Any]:
    """The reported `profile` section: the process, its limits, a few figures per model.

    Reported properties merge, so models that stopped serving (`gone`) are nulled out.
    """
    names = sorted(models)[:MAX_REPORTED_MODELS]
    per_model: dict[str, Any] = {name: None for name in gone if name not in models}
    per_model |= {name: {k: models[name].get(k) for k in REPORTED_MODEL_FIELDS} for name in names}
    return {
        "at": at,
        "window_s": window.get("window_s"),
        "cpu_percent": window.get("cpu_percent"),
        **resources.as_json(),
        "models": per_model,
        "models_omitted": len(models) - len(names),
    }


class HeadroomAlarm:
    """Turns readings into alert transitions: `memory_headroom_low`, then `..._recovered`."""

    def __init__(self, alert_fraction: float) -> None:
        if not 0 <= alert_fraction < 1:
            raise ValueError(f"the headroom alert fraction is in [0, 1), not {alert_fraction}")
        self.alert_fraction = alert_fraction
        self.low = False

    def update(self, resources: Resources) -> str | None:
        low = headroom_low(resources, self.low, self.alert_fraction)
        if low == self.low:
            return None
        self.low = low
        return "memory_headroom_low" if low else "memory_headroom_recovered"


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

    return {
        "requests": requests,
        "error_rate": round(failed / requests, 4) if requests else 0.0,
        "p50_ms": _ms(quantile(latency_bounds, latency, 0.5)),
        "p99_ms": _ms(quantile(latency_bounds, latency, 0.99)),
        "window_s": round(window_s, 1),
    }

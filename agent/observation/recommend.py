"""Right-sizing (pure): from an offline sweep's measurements to settings and container resources.

The sweep (`agent.profiler`) measures each configuration of the agent's knobs in a fresh
process at several offered loads, then swaps the model once. Here:

* a configuration *meets* the target when, at the smallest offered load not below the target
  rate, it achieved the rate (within `RATE_TOLERANCE`), failed nothing, and kept p99 within
  the budget; of those, the one using the least CPU wins (then the lower p99, then less memory);
* the memory limit is the configuration's steady resident memory plus its largest transient
  (a load peak or the swap, when the candidate model loads beside the active one), with
  headroom: what the OOM killer must never see exceeded;
* the CPU limit (`NanoCpus`) is the CPU it used at the target rate, with headroom. CFS enforces
  a quota per 100 ms period, so a quota under the threads that compute at once stalls a burst
  for the rest of the period: with a p99 budget under that period, the quota covers at least
  the intra-op threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MIB = 1 << 20
NANO = 1_000_000_000
CFS_PERIOD_MS = 100.0
RATE_TOLERANCE = 0.95  # a closed schedule on a loaded machine falls a few % short of the rate
MIN_CPUS = 0.1


@dataclass(frozen=True, slots=True, order=True)
class Knobs:
    """One configuration of the agent's own serving knobs."""

    intra_op_threads: int
    max_batch: int
    worker_threads: int
    batching: bool

    def environment(self) -> dict[str, str]:
        """The `EDGEML_*` variables that configure the agent this way."""
        return {
            "EDGEML_INTRA_OP_THREADS": str(self.intra_op_threads),
            "EDGEML_MAX_BATCH": str(self.max_batch),
            "EDGEML_WORKER_THREADS": str(self.worker_threads),
            "EDGEML_BATCHING": "true" if self.batching else "false",
        }

    def label(self) -> str:
        coalescing = "on" if self.batching else "off"
        return (
            f"threads={self.intra_op_threads} max_batch={self.max_batch} "
            f"workers={self.worker_threads} coalescing={coalescing}"
        )


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """The agent under one offered load."""

    offered_rps: float
    achieved_rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    cpu_cores: float
    peak_rss_bytes: int
    batch_rows_mean: float | None = None


@dataclass(frozen=True, slots=True)
class SwapPoint:
    """Resident memory around one hot swap of the same model under load."""

    rss_before_bytes: int
    peak_rss_bytes: int
    rss_after_bytes: int
    seconds: float
    p99_ms: float | None = None  # of the load window around the swap
    window_s: float = 0.0

    @property
    def transient_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.rss_before_bytes)


@dataclass(frozen=True, slots=True)
class ConfigRun:
    """Everything measured of one configuration, in one process."""

    knobs: Knobs
    load_rss_bytes: int  # after the model loaded, before any request
    points: tuple[LoadPoint, ...]
    swap: SwapPoint | None
    error: str | None = None  # the child failed: why

    @property
    def steady_rss_bytes(self) -> int:
        """Resident memory serving, outside swaps: the highest reading after each load ended."""
        return max([self.load_rss_bytes, *(p.peak_rss_bytes for p in self.points)])

    @property
    def peak_rss_bytes(self) -> int:
        swap_peak = self.swap.peak_rss_bytes if self.swap else 0
        return max(self.steady_rss_bytes, swap_peak)

    def at(self, rps: float) -> LoadPoint | None:
        """The measurement at the smallest offered load not below `rps`."""
        above = [p for p in self.points if p.offered_rps >= rps]
        return min(above, key=lambda p: p.offered_rps) if above else None


@dataclass(frozen=True, slots=True)
class Target:
    rps: float
    max_p99_ms: float
    memory_headroom: float = 0.2
    cpu_headroom: float = 0.25

    def __post_init__(self) -> None:
        if not self.rps > 0 or not self.max_p99_ms > 0:
            raise ValueError(f"a target needs a rate and a p99 budget above 0, not {self}")
        if not 0 <= self.memory_headroom <= 4 or not 0 <= self.cpu_headroom <= 4:
            raise ValueError("headroom is a fraction between 0 and 4")


@dataclass(frozen=True, slots=True)
class Recommendation:
    knobs: Knobs
    met: bool
    why: str
    memory_limit_bytes: int
    nano_cpus: int
    predicted_p99_ms: float | None
    predicted_swap_p99_ms: float | None
    swap_window_s: float | None
    predicted_peak_rss_bytes: int
    predicted_cpu_cores: float
    steady_rss_bytes: int
    swap_transient_bytes: int
    rejected: Mapping[str, str] = field(default_factory=dict)


def verdict(run: ConfigRun, target: Target) -> str | None:
    """None when `run` meets `target`, else why not."""
    if run.error is not None:
        return f"failed: {run.error}"
    point = run.at(target.rps)
    if point is None:
        return f"not measured at {target.rps:g} requests/s or more"
    return _point_verdict(point, target)


def _point_verdict(point: LoadPoint, target: Target) -> str | None:
    if point.errors:
        return f"{point.errors} failed requests at {point.offered_rps:g}/s"
    if point.achieved_rps < target.rps * RATE_TOLERANCE:
        return f"achieved {point.achieved_rps:g} of {target.rps:g} requests/s"
    if point.p99_ms is None:
        return f"no request answered at {point.offered_rps:g}/s"
    if point.p99_ms > target.max_p99_ms:
        return f"p99 {point.p99_ms:g} ms over the {target.max_p99_ms:g} ms budget"
    return None


def memory_limit(run: ConfigRun, headroom: float) -> int:
    """Steady resident memory plus the largest transient, with headroom, in whole MiB."""
    return math.ceil(run.peak_rss_bytes * (1 + headroom) / MIB) * MIB


def cpu_limit(cores_used: float, target: Target, knobs: Knobs, host_cpus: float) -> float:
    """Cores for `NanoCpus`, in tenths, capped at the host's."""
    wanted = cores_used * (1 + target.cpu_headroom)
    if target.max_p99_ms < CFS_PERIOD_MS:
        wanted = max(wanted, float(knobs.intra_op_threads))
    tenths = math.ceil(round(wanted * 10, 6)) / 10
    return min(max(tenths, MIN_CPUS), host_cpus)


def _rank(run: ConfigRun, target: Target) -> tuple[float, float, int, Knobs]:
    point = run.at(target.rps)
    assert point is not None  # only runs that meet the target are ranked
    return (round(point.cpu_cores, 2), point.p99_ms or math.inf, run.peak_rss_bytes, run.knobs)


def _closest(run: ConfigRun, target: Target) -> tuple[float, float, Knobs]:
    """For a target nothing meets: the best p99 at the highest rate achieved."""
    point = run.at(target.rps) or (max(run.points, key=lambda p: p.offered_rps, default=None))
    if run.error is not None or point is None:
        return (math.inf, math.inf, run.knobs)
    return (-point.achieved_rps, point.p99_ms or math.inf, run.knobs)


def recommend(runs: Sequence[ConfigRun], target: Target, host_cpus: float) -> Recommendation:
    """The configuration and container resources to use for `target`."""
    if not runs:
        raise ValueError("nothing was measured")
    rejected = {run.knobs.label(): why for run in runs if (why := verdict(run, target))}
    meeting = [run for run in runs if run.knobs.label() not in rejected]
    if meeting:
        best = min(meeting, key=lambda run: _rank(run, target))
        why = f"least CPU of {len(meeting)} configurations meeting the target"
    else:
        best = min(runs, key=lambda run: _closest(run, target))
        why = "no configuration met the target; this one came closest"
    if best.error is not None or not best.points:
        raise ValueError(f"no configuration could be measured: {best.error}")
    point = best.at(target.rps) or max(best.points, key=lambda p: p.offered_rps)
    cpus = cpu_limit(point.cpu_cores, target, best.knobs, host_cpus)
    return Recommendation(
        knobs=best.knobs,
        met=bool(meeting),
        why=why,
        memory_limit_bytes=memory_limit(best, target.memory_headroom),
        nano_cpus=round(cpus * NANO),
        predicted_p99_ms=point.p99_ms,
        predicted_swap_p99_ms=best.swap.p99_ms if best.swap else None,
        swap_window_s=best.swap.window_s if best.swap else None,
        predicted_peak_rss_bytes=best.peak_rss_bytes,
        predicted_cpu_cores=point.cpu_cores,
        steady_rss_bytes=best.steady_rss_bytes,
        swap_transient_bytes=best.peak_rss_bytes - best.steady_rss_bytes,
        rejected=rejected,
    )

"""Drift detection quality and cost: the agent's detector against river's ADWIN and Page-Hinkley.

Seeded and offline. Every stream is fed row by row to the agent's real :class:`DriftMonitor`
(one request per row, every request sampled) and to one ADWIN and one Page-Hinkley per feature
(river's defaults; an alarm on any feature is the stream's alarm; river cannot see missing
values, so they are skipped for it). (A) synthetic streams with a numeric and a categorical
input; (B) scikit-learn's bundled datasets resampled with replacement, with sensor faults
injected into one feature.

    python -m bench.drift [--seeds 10] [--quiet-seeds 20]

A change happens after ``PRE`` rows; a detector's delay is rows from the change to its first
alarm; no alarm within ``HORIZON`` rows is a miss. False alarms are alarms on streams without
any change, per 10,000 rows. Last line: the JSON object written to bench/results/drift.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from river import drift as river_drift
from sklearn import datasets

from agent.observation.baseline import BaselinePack
from agent.observation.detector import DriftState
from agent.observation.drift import DriftMonitor, DriftSettings
from agent.observation.watch import Observer
from bench._machine import machine_busy
from deployment.drift.baseline_pack import BaselineOptions, build_baseline

RESULTS = Path(__file__).parent / "results" / "drift.json"
PRE = 1000
HORIZON = 2000
QUIET_ROWS = 10_000
DETECTORS = ("ours", "adwin", "page_hinkley")

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Source:
    """Training data and a sampler of fresh rows from the same distribution."""

    name: str
    train: dict[str, npt.NDArray[Any]]
    sample: Callable[[np.random.Generator, int], dict[str, Floats]]
    changes: dict[str, Callable[[dict[str, Floats], np.random.Generator], None]]


# --- (A) synthetic ---------------------------------------------------------------------------

CATEGORY_PRIOR = np.array([0.4, 0.3, 0.2, 0.1])


def _synthetic_rows(rng: np.random.Generator, rows: int) -> dict[str, Floats]:
    return {
        "x": rng.standard_normal((rows, 4)),
        "c": rng.choice(4, size=(rows, 1), p=CATEGORY_PRIOR).astype(np.float64),
    }


def _shift(sigmas: float) -> Callable[[dict[str, Floats], np.random.Generator], None]:
    def apply(rows: dict[str, Floats], rng: np.random.Generator) -> None:
        rows["x"][:, 0] += sigmas

    return apply


def _variance(ratio: float) -> Callable[[dict[str, Floats], np.random.Generator], None]:
    def apply(rows: dict[str, Floats], rng: np.random.Generator) -> None:
        rows["x"][:, 0] *= np.sqrt(ratio)

    return apply


def _prior(rows: dict[str, Floats], rng: np.random.Generator) -> None:
    rows["c"][:, 0] = rng.choice(4, size=rows["c"].shape[0], p=[0.1, 0.2, 0.3, 0.4])


def _ramp(rows: dict[str, Floats], rng: np.random.Generator) -> None:
    # From no shift to 1 sigma over 1,000 rows, then held.
    rows["x"][:, 0] += np.minimum(1.0, np.arange(rows["x"].shape[0]) / 1000)


def _missing(rows: dict[str, Floats], rng: np.random.Generator) -> None:
    rows["x"][rng.random(rows["x"].shape[0]) < 0.3, 0] = np.nan


def synthetic() -> Source:
    train = _synthetic_rows(np.random.default_rng(12345), 10_000)
    return Source(
        "synthetic",
        {"x": train["x"], "c": train["c"].astype(np.int64)},
        _synthetic_rows,
        {
            "mean_0.25sd": _shift(0.25),
            "mean_0.5sd": _shift(0.5),
            "mean_1sd": _shift(1.0),
            "variance_x1.5": _variance(1.5),
            "variance_x2": _variance(2.0),
            "categorical_prior": _prior,
            "gradual_ramp": _ramp,
            "missing_burst": _missing,
        },
    )


# --- (B) scikit-learn datasets with sensor faults ----------------------------------------------


def _dataset(name: str) -> Source:
    loader = {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "digits": datasets.load_digits,
        "diabetes": datasets.load_diabetes,
    }[name]
    data = np.asarray(loader().data, dtype=np.float64)
    std = data.std(axis=0)
    column = int(np.argmax(std > 0))  # the first feature that varies
    sd, median = float(std[column]), float(np.median(data[:, column]))

    def sample(rng: np.random.Generator, rows: int) -> dict[str, Floats]:
        return {"x": data[rng.integers(0, data.shape[0], size=rows)].copy()}

    def gain(rows: dict[str, Floats], rng: np.random.Generator) -> None:
        rows["x"][:, column] *= 1.5

    def offset(rows: dict[str, Floats], rng: np.random.Generator) -> None:
        rows["x"][:, column] += 0.5 * sd

    def noise(rows: dict[str, Floats], rng: np.random.Generator) -> None:
        rows["x"][:, column] += rng.normal(0.0, sd, size=rows["x"].shape[0])

    def stuck(rows: dict[str, Floats], rng: np.random.Generator) -> None:
        rows["x"][:, column] = median

    return Source(
        name,
        {"x": data},
        sample,
        {"gain_x1.5": gain, "offset_0.5sd": offset, "noise_1sd": noise, "stuck_at_median": stuck},
    )


# --- detectors -----------------------------------------------------------------------------


def _ours(
    pack: BaselinePack, settings: DriftSettings
) -> Callable[[dict[str, Floats]], Iterator[int]]:
    def run(stream: dict[str, Floats]) -> Iterator[int]:
        ticks = itertools.count()
        monitor = DriftMonitor(pack, settings, clock=lambda: float(next(ticks)) * 1e-9)
        rows = next(iter(stream.values())).shape[0]
        for t in range(rows):
            monitor.observe({name: array[t : t + 1] for name, array in stream.items()}, {}, 1)
            if monitor.pending_rows >= monitor.window_rows:
                for window in monitor.close_windows():
                    if window.changed and window.detector.state is DriftState.DRIFT:
                        yield t

    return run


def _river(factory: Callable[[], Any]) -> Callable[[dict[str, Floats]], Iterator[int]]:
    def run(stream: dict[str, Floats]) -> Iterator[int]:
        columns = np.concatenate(list(stream.values()), axis=1)
        detectors = [factory() for _ in range(columns.shape[1])]
        for t, row in enumerate(columns.tolist()):
            fired = False
            for detector, value in zip(detectors, row, strict=True):
                if math.isnan(value):  # river has no notion of a missing value
                    continue
                detector.update(value)
                fired = fired or detector.drift_detected
            if fired:
                yield t

    return run


def _stream(source: Source, change: str | None, rng: np.random.Generator) -> dict[str, Floats]:
    if change is None:
        return source.sample(rng, QUIET_ROWS)
    before, after = source.sample(rng, PRE), source.sample(rng, HORIZON)
    source.changes[change](after, rng)
    return {name: np.concatenate([before[name], after[name]]) for name in before}


def _evaluate(
    source: Source, seeds: int, quiet_seeds: int, settings: DriftSettings, options: BaselineOptions
) -> tuple[dict[str, Any], BaselinePack]:
    """The detectors on `source`'s streams, and the baseline pack they were scored against."""
    started = time.perf_counter()
    pack = BaselinePack.model_validate(build_baseline(source.train, {}, options), strict=False)
    built = time.perf_counter() - started
    runners = {
        "ours": _ours(pack, settings),
        "adwin": _river(river_drift.ADWIN),
        "page_hinkley": _river(river_drift.PageHinkley),
    }
    out: dict[str, Any] = {"baseline_build_s": round(built, 2), "features": len(pack.features)}
    for detector, run in runners.items():
        alarms = rows = 0
        for seed in range(quiet_seeds):
            stream = _stream(source, None, np.random.default_rng([seed, 1]))
            alarms += sum(1 for _ in run(stream))
            rows += QUIET_ROWS
        delays: dict[str, list[int | None]] = {}
        for change in source.changes:
            delays[change] = []
            for seed in range(seeds):
                stream = _stream(source, change, np.random.default_rng([seed, 2, len(change)]))
                first = next((t - PRE for t in run(stream) if t >= PRE), None)
                delays[change].append(first)
        out[detector] = {
            "false_alarms_per_10k": round(alarms / rows * 10_000, 3),
            "delay": {c: _median(d) for c, d in delays.items()},
            "miss_rate": {
                c: round(sum(x is None for x in d) / len(d), 3) for c, d in delays.items()
            },
        }
    return out, pack


def _median(delays: list[int | None]) -> float | None:
    # A miss counts as an infinite delay, so the median is a miss when most are.
    ordered = sorted(float("inf") if d is None else float(d) for d in delays)
    middle = statistics.median(ordered)
    return None if middle == float("inf") else middle


# --- cost on the hot path ----------------------------------------------------------------------


def overhead_us(pack: BaselinePack, requests_per_second: float, calls: int) -> dict[str, float]:
    """µs per request of the inference path's hook (``Observer.observe``: the lookup of the
    release, the countdown, and the sampled copy) at default settings under a given load, the
    clock simulated so that sampling adapts as it would; against an empty call in the same run.
    Closing windows (the 1 s tick, off the request path) is timed apart, per window."""
    now = [0.0]
    observer = Observer(CollectorRegistry(), clock=lambda: now[0])
    observer.attach("m", 1, pack, "0" * 64)
    rng = np.random.default_rng(0)
    # Requests like the training data, so that no drift alarm muddles the timing.
    requests: list[tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]] = [
        (_synthetic_rows(rng, 1), {}) for _ in range(256)
    ]

    def empty(name: str, version: int, inputs: object, outputs: object, rows: int) -> None:
        return None

    results = {}
    closing: list[float] = []
    for side, target in (("empty", empty), ("observe", observer.observe)):
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            paused = 0.0
            for i in range(calls):
                inputs, outputs = requests[i & 255]
                target("m", 1, inputs, outputs, 1)
                if side == "observe" and i % 1000 == 999:  # one simulated tick
                    now[0] += 1000 / requests_per_second
                    tick = time.perf_counter()
                    windows = observer.watches["m"].totals["windows"]
                    observer.tick()
                    spent = time.perf_counter() - tick
                    paused += spent
                    closed = observer.watches["m"].totals["windows"] - windows
                    if closed:
                        closing.append(spent / closed * 1e6)
            samples.append((time.perf_counter() - started - paused) / calls * 1e6)
        results[side] = statistics.median(samples)
    monitor = observer.watches["m"].drift
    return {
        "observe_us": round(results["observe"], 3),
        "empty_call_us": round(results["empty"], 3),
        "sample_every": monitor.sample_every if monitor else 0,
        "window_close_us": round(statistics.median(closing), 1) if closing else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drift")
    parser.add_argument("--seeds", type=int, default=10, help="streams per change type")
    parser.add_argument("--quiet-seeds", type=int, default=10, help="no-drift streams per source")
    parser.add_argument("--sources", default="synthetic,breast_cancer,wine,digits,diabetes")
    parser.add_argument(
        "--window-rows", type=int, help="the agent's window (default: its shipped default)"
    )
    parser.add_argument("--clip", type=float, help="the CUSUM clip the baselines calibrate")
    args = parser.parse_args()
    busy_before, wall = machine_busy(), time.perf_counter()
    settings = DriftSettings(window_rows=args.window_rows) if args.window_rows else DriftSettings()
    sources = {
        name: synthetic() if name == "synthetic" else _dataset(name)
        for name in args.sources.split(",")
    }
    options = BaselineOptions(clip=args.clip) if args.clip else BaselineOptions()
    evaluated = {
        name: _evaluate(source, args.seeds, args.quiet_seeds, settings, options)
        for name, source in sources.items()
    }
    per_source = {name: result for name, (result, _) in evaluated.items()}
    elapsed = time.perf_counter() - wall
    synthetic_pack = (
        evaluated["synthetic"][1]
        if "synthetic" in evaluated
        else BaselinePack.model_validate(
            build_baseline(synthetic().train, {}, options), strict=False
        )
    )
    cost = {f"{rate}_rps": overhead_us(synthetic_pack, rate, 50_000) for rate in (100, 1000, 5000)}
    summary: dict[str, Any] = {}
    for detector in DETECTORS:
        alarms = [per_source[s][detector]["false_alarms_per_10k"] for s in per_source]
        delay: dict[str, Any] = {}
        miss: dict[str, Any] = {}
        for source in per_source:
            for change, value in per_source[source][detector]["delay"].items():
                key = change if source == "synthetic" else f"{source}:{change}"
                delay[key] = value
                miss[key] = per_source[source][detector]["miss_rate"][change]
        summary[detector] = {
            "false_alarms_per_10k": round(statistics.mean(alarms), 3),
            "delay": delay,
            "miss_rate": miss,
        }
    result = {
        **summary,
        "overhead_us_per_request": cost["1000_rps"]["observe_us"],
        "overhead": cost,
        "per_source": {
            s: {
                "features": v["features"],
                "baseline_build_s": v["baseline_build_s"],
                **{d: {"false_alarms_per_10k": v[d]["false_alarms_per_10k"]} for d in DETECTORS},
            }
            for s, v in per_source.items()
        },
        "settings": {
            "window_rows": settings.window_rows,
            "pre_rows": PRE,
            "horizon_rows": HORIZON,
            "seeds": args.seeds,
            "quiet_seeds": args.quiet_seeds,
            "quiet_rows_per_stream": QUIET_ROWS,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus_busy_during_run": round((machine_busy() - busy_before) / elapsed, 2),
        },
    }
    defaults = args.window_rows is None and args.clip is None
    if defaults and args.sources == parser.get_default("sources"):
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

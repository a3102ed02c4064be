"""Honesty check of `python -m agent profile`: do its predictions hold for a fresh agent?

1. Profile a generated ~22 MB model (`mid_mlp`, seed 1) with the offline profiler: every
   configuration of the grid in its own `agent serve` child, open-loop loads around the
   target rate, one swap under the target load each.
2. Start `python -m agent serve` afresh (managed mode, release folder) with the recommended
   `EDGEML_*` settings, install the model, and offer the target rate open loop for
   `--duration` s; halfway through, hot-swap to a second build (seed 2: same size and
   contract, other weights).
3. Compare: the process's lifetime peak resident memory (`VmHWM`, never reset: what the
   OOM killer would have judged) against the predicted peak (steady + largest swap transient)
   and against the recommended memory limit; the p99 of every request of the window (the swap
   included) against the predicted p99 at the target rate.

The recommended limits are not enforced here (that needs a container engine or a cgroup of
our own, and the machine's cgroups belong to its owner): "no OOM" means the measured peak
stayed under `HostConfig.Memory`. The load generator shares the machine with the agent.

    python -m bench.profile [--target-rps 300] [--max-p99-ms 50] [--duration 30]

Last line: {"predicted_peak_rss_mb", "measured_peak_rss_mb", "rss_error_pct",
"predicted_p99_ms", "measured_p99_ms", "p99_error_pct", ...}; also bench/results/profile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.observation.limits import read_limits
from agent.observation.recommend import Knobs, Target
from agent.observation.resources import parse_vm_hwm
from agent.profiler import (
    Measurement,
    ProfiledModel,
    Release,
    SweepPlan,
    http_client,
    knob_grid,
    report,
    running_child,
    sweep,
)
from bench._machine import machine_busy, wait_for_quiet_machine
from deployment.examples.onnx_models import mid_mlp

RESULTS = Path(__file__).parent / "results" / "profile.json"
MIB = 1 << 20


def _knobs(settings: dict[str, str]) -> Knobs:
    return Knobs(
        intra_op_threads=int(settings["EDGEML_INTRA_OP_THREADS"]),
        max_batch=int(settings["EDGEML_MAX_BATCH"]),
        worker_threads=int(settings["EDGEML_WORKER_THREADS"]),
        batching=settings["EDGEML_BATCHING"] == "true",
    )


def _error_pct(measured: float, predicted: float) -> float:
    return round((measured - predicted) / predicted * 100, 1)


async def validate(
    models: tuple[bytes, bytes], knobs: Knobs, args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """A fresh agent with `knobs` at the target rate across one hot swap.

    The swap comes halfway through the load; its p99 is taken over the same span around the
    swap as the profile's (a quarter of it before the manifest is written), the steady p99
    over the first `--measure` s before that span.
    """
    loop = asyncio.get_running_loop()
    release = Release.prepare(models, scratch / "releases")
    plan = SweepPlan((knobs,), (args.target_rps,), warmup_s=0.0, measure_s=args.duration)
    swap_window_s = 2 * args.measure
    async with (
        running_child(scratch, knobs, release.trusted_keys, plan.startup_timeout_s) as child,
        http_client() as session,
    ):
        sampler = loop.create_task(child.memory.sample_forever())
        measurement = Measurement(child, session, release, plan, knobs, sys.stderr)
        await measurement.publish(1)
        busy_before, started = machine_busy(), loop.time()
        load = loop.create_task(measurement.offer(args.target_rps, args.duration))
        await asyncio.sleep(args.duration / 2)
        swapped_at = loop.time()
        await measurement.publish(2)
        swap_s = loop.time() - swapped_at
        window = await load
        busy = (machine_busy() - busy_before) / (loop.time() - started)
        status = await asyncio.to_thread(Path(f"/proc/{child.process.pid}/status").read_text)
        sampler.cancel()
        peak = max(parse_vm_hwm(status) or 0, child.memory.sampled_peak)
    swap_start = swapped_at - swap_window_s / 4
    latencies = np.asarray(window.latencies_s) * 1000
    return {
        "peak_rss_bytes": peak,
        "swap_window_p99_ms": window.p99_ms(swap_start, swap_start + swap_window_s),
        "steady_p99_ms": window.p99_ms(swap_start - args.measure, swap_start),
        "whole_p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "whole_p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "swap_s": round(swap_s, 3),
        "answered": int(latencies.size),
        "failed": window.errors,
        "machine_busy_cores": round(busy, 2),  # the agent, the load, everyone else
    }


async def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    models = (mid_mlp(1).SerializeToString(), mid_mlp(2).SerializeToString())
    target = Target(args.target_rps, args.max_p99_ms)
    plan = SweepPlan(
        knob_grid(args.threads, (8, 32), (1,), (True, False)),
        loads_rps=tuple(round(args.target_rps * f, 1) for f in (0.5, 1.0, 1.5)),
        warmup_s=args.warmup,
        measure_s=args.measure,
        swap_rps=args.target_rps,
    )
    quiet_before_profile = wait_for_quiet_machine(0.5, 120)
    busy_before, started = machine_busy(), time.monotonic()
    runs = await sweep(models[0], plan, sys.stderr)
    document = report(
        ProfiledModel("mid_mlp-seed1.onnx", models[0]),
        runs,
        target,
        limits=read_limits(),
        plan=plan,
    ).document()
    # Cores busy machine-wide while profiling: the agent, the load generator, and everyone else.
    profile_busy = (machine_busy() - busy_before) / (time.monotonic() - started)
    best = document["recommendation"]
    predicted = best["predicted"]
    print(f"recommended: {best['settings']} {best['createOptions']}", file=sys.stderr)
    quiet_before_validation = wait_for_quiet_machine(0.5, 120)
    measured = await validate(models, _knobs(best["settings"]), args, scratch / "validate")
    limit = best["createOptions"]["HostConfig"]["Memory"]
    return {
        "predicted_peak_rss_mb": round(predicted["peak_rss_bytes"] / MIB, 1),
        "measured_peak_rss_mb": round(measured["peak_rss_bytes"] / MIB, 1),
        "rss_error_pct": _error_pct(measured["peak_rss_bytes"], predicted["peak_rss_bytes"]),
        # p99 of a window with one swap: the profile's swap window against the same span
        # around the validation's swap.
        "predicted_p99_ms": predicted["swap_window_p99_ms"],
        "measured_p99_ms": measured["swap_window_p99_ms"],
        "p99_error_pct": _error_pct(
            measured["swap_window_p99_ms"], predicted["swap_window_p99_ms"]
        ),
        "predicted_steady_p99_ms": predicted["p99_ms"],
        "measured_steady_p99_ms": measured["steady_p99_ms"],
        "steady_p99_error_pct": _error_pct(measured["steady_p99_ms"], predicted["p99_ms"]),
        "recommended_memory_mb": round(limit / MIB, 1),
        "peak_under_memory_limit": measured["peak_rss_bytes"] < limit,
        "recommended_nano_cpus": best["createOptions"]["HostConfig"]["NanoCpus"],
        "recommended_settings": best["settings"],
        "target_met_in_profile": best["met"],
        "validation": measured,
        "predicted": predicted,
        "configurations": [
            {"settings": run["settings"], "verdict": run["verdict"], "swap": run["swap"]}
            for run in document["configurations"]
        ],
        "setup": {
            "model": "mid_mlp seed 1 (profiled), swapped to seed 2 in the validation",
            "model_mib": round(len(models[0]) / MIB, 1),
            "target_rps": args.target_rps,
            "max_p99_ms": args.max_p99_ms,
            "profile_loads_rps": list(plan.loads_rps),
            "profile_measure_s": args.measure,
            "validation_s": args.duration,
            "profile_machine_busy_cores": round(profile_busy, 2),
            # Cores others used in the second before each phase (after waiting up to 2 min).
            "other_cores_before_profile": quiet_before_profile,
            "other_cores_before_validation": quiet_before_validation,
            "limits_enforced": False,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "machine": "shared with other engineers' builds and tests while measured",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-rps", type=float, default=300.0)
    parser.add_argument("--max-p99-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=float, default=1.0, help="profile: s before each load")
    parser.add_argument("--measure", type=float, default=5.0, help="profile: s per load")
    parser.add_argument("--duration", type=float, default=30.0, help="validation: s of load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:
        result = asyncio.run(bench(args, Path(scratch)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

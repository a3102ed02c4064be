"""What the agent's in-process inference path costs over a bare `InferenceSession.run`.

The agent path is `InferenceService.infer_versioned` as the HTTP and route handlers call it:
validation, dispatch choice, batching machinery, metrics. Both sides use the same session
object, so the model, thread settings and memory are identical. Rounds alternate the two sides
to share the machine's noise; the result is the median over rounds of per-call time.

    python -m bench.overhead [--rounds 40] [--calls 200] [--drift]

With `--drift`, a third side runs the same agent path with drift watching on (an observer with
a baseline of the model, default sampling, windows closed between rounds as the 1 s tick
would); its result goes to `overhead-drift.json`.

Last line: {"tiny_b1_ratio": ..., "tiny_b64_ratio": ..., "mid_b1_ratio": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client import CollectorRegistry

from agent.observation.baseline import BaselinePack
from agent.observation.metrics import InferenceMetrics
from agent.observation.watch import Observer
from agent.serving.engine import LoadedModel, RuntimeOptions, load_model
from agent.serving.inference import BatchingPolicy, InferenceService
from deployment.drift.baseline_pack import BaselineOptions, build_baseline
from deployment.examples.onnx_models import mid_mlp, tiny_mlp

RESULTS = Path(__file__).parent / "results" / "overhead.json"
DRIFT_RESULTS = Path(__file__).parent / "results" / "overhead-drift.json"


def _drift_observer(model: LoadedModel, features: int) -> Observer:
    """An observer watching `model` with a baseline made from its own outputs (default
    settings: the agent's sampling as shipped)."""
    x = np.random.default_rng(1).standard_normal((2000, features)).astype(np.float32)
    outputs = dict(zip(model.contract.output_names, model.run({"input": x}, None), strict=True))
    options = BaselineOptions(window_sizes=(100,), resamples=200, simulated_windows=20_000)
    pack = BaselinePack.model_validate(build_baseline({"input": x}, outputs, options), strict=False)
    observer = Observer(CollectorRegistry())
    observer.attach("bench", model.version, pack, "0" * 64)
    return observer


async def _measure(
    model: LoadedModel, rows: int, features: int, rounds: int, calls: int, *, drift: bool
) -> dict[str, float | str]:
    metrics = InferenceMetrics(CollectorRegistry())
    service = InferenceService("bench", metrics, policy=BatchingPolicy())
    service.activate(model)
    # The same service with its observer on or off: a second service measured apart differs
    # by more than the observer costs (caches, allocation patterns).
    observer = _drift_observer(model, features) if drift else None
    x = np.random.default_rng(0).standard_normal((rows, features)).astype(np.float32)
    feed = {"input": x}
    session = model.session
    names = list(model.contract.output_names)
    times: dict[str, list[float]] = {"bare": [], "agent": [], "drift": []}
    for _ in range(5):  # warm every path up
        session.run(names, feed)
        await service.infer(feed)
    sides = ["bare", "agent", *(["drift"] if drift else [])]
    for round_index in range(rounds):
        # Rotate which side goes first, so none always runs on a warmer cache.
        shift = round_index % len(sides)
        for side in sides[shift:] + sides[:shift]:
            start = time.perf_counter()
            if side == "bare":
                for _ in range(calls):
                    session.run(names, feed)
            else:
                service.observer = observer if side == "drift" else None
                for _ in range(calls):
                    await service.infer_versioned(feed)
            times[side].append((time.perf_counter() - start) / calls)
        if observer is not None:
            observer.tick()  # what the 1 s tick does, outside the timed loops
    await service.close()
    bare_us = statistics.median(times["bare"]) * 1e6
    agent_us = statistics.median(times["agent"]) * 1e6
    result: dict[str, float | str] = {
        "bare_us": round(bare_us, 2),
        "agent_us": round(agent_us, 2),
        "ratio": round(agent_us / bare_us, 4),
        "dispatch": str(service.metadata().parameters["dispatch"]),
    }
    if observer is not None:
        drift_us = statistics.median(times["drift"]) * 1e6
        watch = observer.watches["bench"]
        result |= {
            "drift_us": round(drift_us, 2),
            "drift_ratio": round(drift_us / bare_us, 4),
            "drift_extra_us": round(drift_us - agent_us, 2),
            "sample_every": watch.drift.sample_every if watch.drift else 0,
            "drift_windows": watch.totals["windows"],
        }
    return result


def _load(data: bytes, max_rows: int) -> LoadedModel:
    return load_model(
        data,
        name="bench",
        version=1,
        sha256=hashlib.sha256(data).hexdigest(),
        options=RuntimeOptions(intra_op_threads=1, inter_op_threads=1),
        max_rows=max_rows,
    )


async def _main(rounds: int, calls: int, *, drift: bool) -> dict[str, object]:
    tiny = _load(bytes(tiny_mlp().SerializeToString()), max_rows=64)
    mid = _load(bytes(mid_mlp().SerializeToString()), max_rows=32)
    cases = {
        "tiny_b1": await _measure(tiny, 1, 32, rounds, calls, drift=drift),
        "tiny_b64": await _measure(tiny, 64, 32, rounds, calls, drift=drift),
        "mid_b1": await _measure(mid, 1, 1024, rounds, max(calls // 10, 10), drift=drift),
    }
    for name, case in cases.items():
        print(
            f"{name:9s} bare {case['bare_us']:9.2f} µs  agent {case['agent_us']:9.2f} µs  "
            f"ratio {case['ratio']:.3f}"
            + (f"  with drift {case['drift_us']:9.2f} µs" if drift else "")
        )
    ratios = {f"{name}_ratio": case["ratio"] for name, case in cases.items()}
    if drift:
        ratios |= {f"{name}_drift_ratio": case["drift_ratio"] for name, case in cases.items()}
    return {
        **ratios,
        "details": cases,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument(
        "--drift", action="store_true", help="also measure the path with drift watching on"
    )
    args = parser.parse_args()
    result = asyncio.run(_main(args.rounds, args.calls, drift=args.drift))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (DRIFT_RESULTS if args.drift else RESULTS).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

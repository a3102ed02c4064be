"""What the agent's in-process inference path costs over a bare `InferenceSession.run`.

The agent path is `InferenceService.infer_versioned` as the HTTP and route handlers call it:
validation, dispatch choice, batching machinery, metrics. Both sides use the same session
object, so the model, thread settings and memory are identical. Rounds alternate the two sides
to share the machine's noise; the result is the median over rounds of per-call time.

    python -m bench.overhead [--rounds 40] [--calls 200]

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

from agent.observation.metrics import InferenceMetrics
from agent.serving.engine import LoadedModel, RuntimeOptions, load_model
from agent.serving.inference import BatchingPolicy, InferenceService
from deployment.example_models import mid_mlp, tiny_mlp

RESULTS = Path(__file__).parent / "results" / "overhead.json"


async def _measure(
    model: LoadedModel, rows: int, features: int, rounds: int, calls: int
) -> dict[str, float | str]:
    service = InferenceService(
        "bench", InferenceMetrics(CollectorRegistry()), policy=BatchingPolicy()
    )
    service.activate(model)
    x = np.random.default_rng(0).standard_normal((rows, features)).astype(np.float32)
    feed = {"input": x}
    session = model.session
    names = list(model.contract.output_names)
    bare: list[float] = []
    agent: list[float] = []
    for _ in range(5):  # warm both paths up
        session.run(names, feed)
        await service.infer(feed)
    for round_index in range(rounds):
        # Alternate which side goes first, so neither always runs on a warmer cache.
        sides = ("bare", "agent") if round_index % 2 == 0 else ("agent", "bare")
        for side in sides:
            start = time.perf_counter()
            if side == "bare":
                for _ in range(calls):
                    session.run(names, feed)
                bare.append((time.perf_counter() - start) / calls)
            else:
                for _ in range(calls):
                    await service.infer_versioned(feed)
                agent.append((time.perf_counter() - start) / calls)
    await service.close()
    bare_us = statistics.median(bare) * 1e6
    agent_us = statistics.median(agent) * 1e6
    return {
        "bare_us": round(bare_us, 2),
        "agent_us": round(agent_us, 2),
        "ratio": round(agent_us / bare_us, 4),
        "dispatch": str(service.metadata().parameters["dispatch"]),
    }


def _load(data: bytes, max_rows: int) -> LoadedModel:
    return load_model(
        data,
        name="bench",
        version=1,
        sha256=hashlib.sha256(data).hexdigest(),
        options=RuntimeOptions(intra_op_threads=1, inter_op_threads=1),
        max_rows=max_rows,
    )


async def _main(rounds: int, calls: int) -> dict[str, object]:
    tiny = _load(bytes(tiny_mlp().SerializeToString()), max_rows=64)
    mid = _load(bytes(mid_mlp().SerializeToString()), max_rows=32)
    cases = {
        "tiny_b1": await _measure(tiny, 1, 32, rounds, calls),
        "tiny_b64": await _measure(tiny, 64, 32, rounds, calls),
        "mid_b1": await _measure(mid, 1, 1024, rounds, max(calls // 10, 10)),
    }
    for name, case in cases.items():
        print(
            f"{name:9s} bare {case['bare_us']:9.2f} µs  agent {case['agent_us']:9.2f} µs  "
            f"ratio {case['ratio']:.3f}"
        )
    return {
        **{f"{name}_ratio": case["ratio"] for name, case in cases.items()},
        "details": cases,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(_main(args.rounds, args.calls))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

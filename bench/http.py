"""The agent against KServe over HTTP: v2 JSON infer at batch 1 from 32 closed-loop clients.

Configurations, each its own server subprocess, one at a time, measured by the same load
generator in the same run:

    agent          `python -m agent serve` with its defaults (micro-batching on)
    agent_nobatch  the same with EDGEML_BATCHING=false
    kserve         KServe 0.21's Python model server (`bench/_kserve_server.py`, one worker,
                   gRPC off, no per-request log lines) serving the same ONNX file with the same
                   ORT session settings, run by `.venv-kserve/bin/python` (kserve's pins clash
                   with the project's, so the bench creates that venv itself once)

for the tiny model (32 -> 8, ~20 us a call) and the mid one (1024 -> 10, ~1 ms).

The load generator (`bench/_loadgen.py`) runs on asyncio + aiohttp inside this process, which
does nothing else while it measures; being in-process lets it read its own, the server's and
the machine's CPU clocks at the same instants, the window's edges. `client_cores` near 1.0
means a run is bound by the client, not the server; `other_cores` is CPU that neither used
(other work on a shared machine), the first thing to look at when numbers look odd.

Every configuration runs `--rounds` times, in an order rotated each round, and each statistic
is the median over its rounds (`*_rps_min` / `*_rps_max` keep the spread).

    python -m bench.http [--duration 10] [--warmup 2] [--clients 32] [--rounds 3]
                         [--models tiny,mid] [--configs agent,agent_nobatch,kserve]

Last line: {"tiny": {"agent_rps", "agent_nobatch_rps", "kserve_rps", "agent_p99_ms",
"kserve_p99_ms", ...}, "mid": {...}, "setup": {...}}; the same JSON goes to
bench/results/http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench._loadgen import LoadSpec, run_load
from bench._machine import machine_busy, stop, wait_for_quiet_machine
from deployment.examples.onnx_models import mid_mlp, save, tiny_mlp

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "http.json"
KSERVE_VENV = REPO / ".venv-kserve"
# The version whose v2 handler and ModelServer start-up _kserve_server.py was written against.
KSERVE_REQUIREMENTS = ("kserve~=0.21.0", "onnxruntime", "numpy")
KSERVE_SERVER = Path(__file__).parent / "_kserve_server.py"
CONFIGS = ("agent", "agent_nobatch", "kserve")


@dataclass(frozen=True)
class BenchModel:
    name: str
    build: Callable[[], onnx.ModelProto]
    features: int
    outputs: int


MODELS = {
    "tiny": BenchModel("tiny", tiny_mlp, features=32, outputs=8),
    "mid": BenchModel("mid", mid_mlp, features=1024, outputs=10),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ensure_kserve_venv(venv: Path = KSERVE_VENV) -> Path:
    """The python of a venv holding kserve; created once and reused while it imports."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import kserve, onnxruntime, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(KSERVE_REQUIREMENTS)} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *KSERVE_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


def _server_argv(config: str, model: Path, name: str, port: int, kserve: Path) -> list[str]:
    if config == "kserve":
        # -P: a script's directory goes first on sys.path, and bench/http.py there would
        # shadow the standard library's `http` package that kserve imports.
        return [
            str(kserve),
            "-P",
            str(KSERVE_SERVER),
            f"--model_path={model}",
            f"--model_name={name}",
            f"--http_port={port}",
            "--workers=1",
            "--enable_grpc=false",
        ]
    return [
        sys.executable,
        "-m",
        "agent",
        "serve",
        f"--model={model}",
        f"--name={name}",
        "--host=127.0.0.1",
        f"--http-port={port}",
        f"--metrics-port={free_port()}",
    ]


def _server_env(config: str) -> dict[str, str]:
    # A stray EDGEML_* from the caller's shell would change (or, misspelt, stop) the agent.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    if config == "agent_nobatch":
        env["EDGEML_BATCHING"] = "false"
    return env


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


@contextmanager
def running_server(
    argv: list[str], env: dict[str, str], ready_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start, wait until the model is ready, yield, then SIGTERM and wait."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _ready(ready_url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{argv[:4]} did not become ready:\n{tail}")
            time.sleep(0.2)
        yield process
    finally:
        stop(process)


def _mean_batch_rows(metrics_url: str) -> float | None:
    """Rows per ONNX Runtime call over the agent's whole run (warm-up included)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "agent_inference_batch_rows"
        for sample in family.samples
    }
    count = samples.get("agent_inference_batch_rows_count", 0.0)
    if not count:
        return None
    return round(samples["agent_inference_batch_rows_sum"] / count, 2)


def measure(
    config: str,
    model: BenchModel,
    *,
    path: Path,
    body: bytes,
    args: argparse.Namespace,
    kserve: Path,
) -> dict[str, float | int | None]:
    busy = wait_for_quiet_machine(args.quiet_below, args.quiet_wait)
    port = free_port()
    argv = _server_argv(config, path, model.name, port, kserve)
    base = f"http://127.0.0.1:{port}"
    log = Path(args.logs) / f"{model.name}-{config}.log"
    ready = f"{base}/v2/models/{model.name}/ready"
    with running_server(argv, _server_env(config), ready, log) as process:
        server = psutil.Process(process.pid)

        def server_cpu() -> float:
            times = server.cpu_times()
            return float(times.user + times.system)

        spec = LoadSpec(
            url=f"{base}/v2/models/{model.name}/infer",
            body=body,
            output_shape=(1, model.outputs),
            clients=args.clients,
            warmup_s=args.warmup,
            duration_s=args.duration,
        )
        clocks = {"client": time.process_time, "server": server_cpu, "machine": machine_busy}
        result = asyncio.run(run_load(spec, clocks))
        summary: dict[str, float | int | None] = dict(result.summary())
        # CPU that neither side of the benchmark used: other work sharing the 2 cores.
        machine = summary.pop("machine_cores") or 0.0
        other = machine - (summary["client_cores"] or 0.0) - (summary["server_cores"] or 0.0)
        summary["other_cores"] = round(max(0.0, other), 2)
        summary["busy_before_cores"] = busy
        if config != "kserve":
            metrics_port = next(a for a in argv if a.startswith("--metrics-port=")).split("=")[1]
            summary["mean_batch_rows"] = _mean_batch_rows(
                f"http://127.0.0.1:{metrics_port}/metrics"
            )
    if result.errors:
        print(f"  {model.name} {config} errors by kind: {dict(result.errors)}")
    return summary


def _aggregate(runs: list[dict[str, float | int | None]]) -> dict[str, float | int]:
    """Median of each statistic over the rounds, the rps extremes, the errors summed."""
    keys = [k for k in runs[0] if all(r.get(k) is not None for r in runs)]
    out: dict[str, float | int] = {
        key: round(float(statistics.median(float(r[key] or 0.0) for r in runs)), 3)
        for key in keys
        if key not in {"ok", "errors"}
    }
    rps = [float(r["rps"] or 0.0) for r in runs]
    out |= {"rps_min": min(rps), "rps_max": max(rps)}
    out["errors"] = sum(int(r["errors"] or 0) for r in runs)
    return out


def _request_body(model: BenchModel) -> bytes:
    x = np.random.default_rng(0).standard_normal(model.features).astype(np.float32)
    tensor = {"name": "input", "shape": [1, model.features], "datatype": "FP32", "data": x.tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per config")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of every config, in rotating order"
    )
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated, run in this order"
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="before each run, wait until other work uses fewer cores than this",
    )
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="seconds, at most")
    parser.add_argument("--logs", default=None, help="server logs directory (default: a tmp dir)")
    args = parser.parse_args()
    kserve = ensure_kserve_venv()
    kserve_version = subprocess.run(
        [str(kserve), "-c", "import importlib.metadata as m; print(m.version('kserve'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    configs = args.configs.split(",")
    result: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        args.logs = args.logs or scratch
        for key in args.models.split(","):
            model = MODELS[key]
            path = save(model.build(), Path(scratch) / f"{model.name}.onnx")
            body = _request_body(model)
            runs: dict[str, list[dict[str, float | int | None]]] = {c: [] for c in configs}
            for round_index in range(args.rounds):
                # Rotate the order so no configuration always runs first (or last) in a round.
                shift = round_index % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    summary = measure(config, model, path=path, body=body, args=args, kserve=kserve)
                    print(f"{model.name:5} {config:14} {json.dumps(summary)}", flush=True)
                    runs[config].append(summary)
            result[model.name] = {
                f"{config}_{key}": value
                for config, summaries in runs.items()
                for key, value in _aggregate(summaries).items()
            }
    result["setup"] = {
        "clients": args.clients,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "aggregate": "median over rounds per statistic; rps_min/rps_max give the spread",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kserve": kserve_version,
        "protocol": "v2 REST JSON, batch 1, keep-alive, closed loop",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The demo: serve a generated example model with the agent and call it as a client would.

    python -m demo [--keep-running] [--http-port 8000] [--metrics-port 9600]

It builds the example model, starts `python -m agent serve` as its own process, waits for
readiness, sends Open Inference Protocol v2 requests (JSON, then concurrent ones that the
agent coalesces), prints what came back and how to call it yourself, and stops the agent
with SIGTERM. With --keep-running the agent stays up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from deployment.example_models import save, tiny_mlp

RUN_DIR = Path("run/demo")
FEATURES = 32


def _request(rows: int, seed: int) -> dict[str, object]:
    data = np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)
    return {
        "id": f"demo-{seed}",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [rows, FEATURES],
                "data": data.astype(np.float64).ravel().round(4).tolist(),
            }
        ],
    }


async def _wait_ready(base: str, process: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"demo: the agent exited with code {process.returncode}")
            try:
                async with session.get(f"{base}/v2/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("demo: the agent did not become ready within 60 s")


async def _exercise(base: str, metrics_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v2/models/tiny") as response:
            metadata = await response.json()
        print("model metadata:", json.dumps(metadata))
        async with session.post(f"{base}/v2/models/tiny/infer", json=_request(2, 1)) as response:
            answer = await response.json()
        print("one request, 2 rows ->", json.dumps(answer)[:300], "...")

        async def one(seed: int) -> int:
            async with session.post(
                f"{base}/v2/models/tiny/infer", json=_request(1, seed)
            ) as response:
                await response.read()
                return response.status

        started = time.perf_counter()
        statuses = await asyncio.gather(*(one(seed) for seed in range(500)))
        elapsed = time.perf_counter() - started
        ok = statuses.count(200)
        print(f"500 concurrent requests: {ok} answered 200 in {elapsed:.2f} s")
        async with session.post(
            f"{base}/v2/models/tiny/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}
                ]
            },
        ) as response:
            print(f"a wrong shape gets {response.status}:", await response.text())
        async with session.get(metrics_url) as response:
            lines = (await response.text()).splitlines()
        print("from /metrics:")
        for line in lines:
            if line.startswith(("agent_inference_requests_total", "agent_model_info")):
                print("  ", line)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--keep-running", action="store_true", help="leave the agent up")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=9600)
    args = parser.parse_args()

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    model = save(tiny_mlp(), RUN_DIR / "tiny.onnx")
    base = f"http://127.0.0.1:{args.http_port}"
    metrics_url = f"http://127.0.0.1:{args.metrics_port}/metrics"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    env["EDGEML_LOG_FORMAT"] = "json"
    log_path = RUN_DIR / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed args
            [
                sys.executable, "-m", "agent", "serve", "--model", str(model),
                "--host", "127.0.0.1", "--http-port", str(args.http_port),
                "--metrics-port", str(args.metrics_port),
            ],
            stdout=log,
            stderr=log,
            env=env,
        )  # fmt: skip
        try:
            asyncio.run(_wait_ready(base, agent))
            print(f"agent serving {model} at {base} (logs: {log_path})")
            asyncio.run(_exercise(base, metrics_url))
            print("\ncall it yourself:")
            body = json.dumps(_request(1, 7))
            print(f"  curl -s -X POST {base}/v2/models/tiny/infer -d '{body}'")
            print(f"  curl -s {metrics_url} | grep agent_")
            if args.keep_running:
                print("\nthe agent keeps running; Ctrl-C stops it")
                agent.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                code = agent.wait(15)
                print(f"agent stopped with SIGTERM, exit code {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The device image: its size, its venv layer, start to ready and idle memory, in a container
and as a plain process.

The image is the one `make image` builds (a cached build; the engine is started when none
runs and stopped after). Each round, interleaved, starts the same command twice: `python -m
agent serve --model tiny.onnx` in a container (`docker run --entrypoint python`, host network,
the model mounted read-only) and, as the baseline, as a process of this venv outside any
container. Start to ready is from the `docker run` call (or the process's spawn) to the first
200 of `/v2/health/ready`: a cold start of the server (nothing of it running before), with the
page cache as the machine has it (dropping caches would disturb everyone else on a shared
machine). The first round is reported apart (`first_ready_s`), the others as medians. Idle
memory is read after `--idle` s without requests: `docker stats` (the container's cgroup, page
cache excluded) and the resident set of the server process itself, read the same way for both
(/proc/<pid>/status VmRSS).

    python -m bench.image [--rounds 5] [--idle 5]

Last line: {"image_mb", "venv_layer_mb", "container": {...}, "process": {...}, "ratios": {...}};
the same JSON goes to bench/results/image.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench._machine import stop, wait_for_quiet_machine
from deployment.examples.onnx_models import tiny_mlp
from deployment.image.build import (
    IMAGE_NAME,
    REPO,
    build_default,
    default_tag,
    size_bytes,
)
from deployment.image.docker import Docker, running_engine

RESULTS = Path(__file__).parent / "results" / "image.json"
LABEL = "org.edge-mlops.bench=image"
MB = 1e6
MIB = 1024 * 1024
# What the README promises for the image (MB of 10^6 bytes, as `docker images` prints them).
BUDGET_MB = {"image": 400, "venv_layer": 190}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(port: int, started: float, timeout_s: float = 120.0) -> float:
    """Seconds from `started` (a monotonic instant) to the first 200 of /v2/health/ready."""
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except urllib.error.HTTPError as error:
            error.close()
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"not ready on port {port} within {timeout_s} s")


def _vm_rss_mib(status: str) -> float:
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024 / MIB


@dataclass(frozen=True)
class Sample:
    ready_s: float
    rss_mib: float
    cgroup_mib: float | None  # docker stats; None for the plain process


def _serve_args(model: str, port: int) -> list[str]:
    return ["-m", "agent", "serve", "--model", model, "--host", "127.0.0.1",
            "--http-port", str(port), "--metrics-port", "0"]  # fmt: skip


def run_container(docker: Docker, image: str, models: Path, idle_s: float) -> Sample:
    port = _free_port()
    name = f"edge-mlops-bench-{secrets.token_hex(4)}"
    started = time.monotonic()
    docker(
        "run", "--detach", "--name", name, "--label", LABEL, "--network", "host",
        f"--volume={models}:/models:ro", "--entrypoint", "python", image,
        *_serve_args("/models/tiny.onnx", port),
    )  # fmt: skip
    try:
        ready = _wait_ready(port, started)
        time.sleep(idle_s)
        stats = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout
        cgroup = size_bytes(stats.split("/")[0]) / MIB
        rss = _vm_rss_mib(docker("exec", name, "cat", "/proc/1/status").stdout)
    finally:
        docker("stop", "--time", "10", name, check=False)
        docker("rm", "--force", "--volumes", name, check=False)
    return Sample(ready, rss, cgroup)


def run_process(model: Path, idle_s: float) -> Sample:
    port = _free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *_serve_args(str(model), port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = _wait_ready(port, started)
        time.sleep(idle_s)
        rss = _vm_rss_mib(Path(f"/proc/{process.pid}/status").read_text())
    finally:
        stop(process)
    return Sample(ready, rss, None)


def image_sizes(docker: Docker, image: str) -> dict[str, Any]:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    history = docker(
        "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", image
    ).stdout
    # The runtime stage's COPY of the builder's venv: `COPY dir:<hash> in /opt/venv` from the
    # classic builder, `COPY /opt/venv /opt/venv # buildkit` from BuildKit.
    venv = [
        int(row.split("\t")[0])
        for row in history.splitlines()
        if "COPY" in row and "/opt/venv" in row
    ]
    if len(venv) != 1:
        raise RuntimeError(f"expected one venv layer in the image history, found {len(venv)}")
    return {"image_mb": round(size / MB, 1), "venv_layer_mb": round(venv[0] / MB, 1)}


def _summary(samples: list[Sample]) -> dict[str, Any]:
    warm = samples[1:] or samples
    summary: dict[str, Any] = {
        "first_ready_s": round(samples[0].ready_s, 3),
        "ready_s_median": round(statistics.median(s.ready_s for s in warm), 3),
        "idle_rss_mib_median": round(statistics.median(s.rss_mib for s in samples), 1),
    }
    cgroups = [s.cgroup_mib for s in samples if s.cgroup_mib is not None]
    if cgroups:
        summary["idle_docker_stats_mib_median"] = round(statistics.median(cgroups), 1)
    return summary


def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    models = scratch / "models"
    models.mkdir(mode=0o755)
    model = models / "tiny.onnx"
    model.write_bytes(tiny_mlp().SerializeToString())
    model.chmod(0o644)  # the container's uid 10001 reads it
    docker = Docker()
    with running_engine(docker, scratch / "dockerd.log") as engine:
        build = build_default(docker, args.tag, scratch)
        sizes = image_sizes(docker, build.tag)
        base = next(iter(build.bases))
        base_mb = int(docker("image", "inspect", "--format", "{{.Size}}", base).stdout) / MB
        in_container: list[Sample] = []
        plain: list[Sample] = []
        busy: list[float] = []
        for _ in range(args.rounds):
            busy.append(wait_for_quiet_machine(0.5, 20.0))
            in_container.append(run_container(docker, build.tag, models, args.idle))
            plain.append(run_process(model, args.idle))
        started_engine = engine.started_here
    container, process = _summary(in_container), _summary(plain)
    return {
        **sizes,
        "base": base + (" (Debian stand-in made with debootstrap)" if build.stand_in else ""),
        "base_mb": round(base_mb, 1),
        "budget_mb": BUDGET_MB,
        "within_budget": sizes["image_mb"] <= BUDGET_MB["image"]
        and sizes["venv_layer_mb"] <= BUDGET_MB["venv_layer"],
        "container": container,
        "process": process,
        "ratios": {
            "ready_s": round(container["ready_s_median"] / process["ready_s_median"], 2),
            "idle_rss": round(container["idle_rss_mib_median"] / process["idle_rss_mib_median"], 2),
        },
        "rounds": args.rounds,
        "idle_s": args.idle,
        "busy_cores_before_rounds": busy,
        "engine_started_by_bench": started_engine,
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "note": "shared 2-core machine, other engineers' builds and tests running",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="container + process pairs")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before memory")
    parser.add_argument("--tag", default=None, help=f"default {IMAGE_NAME}:<project version>")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.tag = args.tag or default_tag()
    with tempfile.TemporaryDirectory(prefix="bench-image-") as scratch:
        Path(scratch).chmod(0o755)
        result = bench(args, Path(scratch))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Limits read inside the real container: `docker run --memory --cpus` reach the agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.profiler import read_profile
from deployment.examples.onnx_models import save, tiny_mlp
from tests.support.docker import BUILD_TIMEOUT_S, Containers, readable_copy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(BUILD_TIMEOUT_S)]

# What `python -m module` does at start, printed instead of acted on.
READ = (
    "import json; from agent.observation.limits import read_limits, default_intra_op_threads; "
    "limits = read_limits(); "
    "print(json.dumps({**limits.as_json(), 'threads': default_intra_op_threads(limits)}))"
)


@pytest.mark.parametrize(
    ("flags", "memory", "quota", "threads"),
    [
        (("--memory=256m", "--cpus=1.5"), 256 << 20, 1.5, 1),
        (("--memory=1g", "--cpus=0.5"), 1 << 30, 0.5, 1),
        ((), None, None, 1),
    ],
    ids=["256m-1.5cpus", "1g-0.5cpus", "unlimited"],
)
def test_the_agent_reads_the_limits_the_engine_sets(
    containers: Containers,
    flags: tuple[str, ...],
    memory: int | None,
    quota: float | None,
    threads: int,
) -> None:
    result = containers.run_once(*flags, "--entrypoint=python", command=["-c", READ])
    limits = json.loads(result.stdout.strip().splitlines()[-1])
    assert limits["memory_limit_bytes"] == memory
    assert limits["cpu_quota_cores"] == quota
    assert limits["cgroup"] in {"v1", "v2"}
    assert limits["threads"] == threads


def test_the_offline_profile_runs_in_the_image_under_its_limits(
    containers: Containers, tmp_path: Path
) -> None:
    """`python -m agent profile` from the device image: its children serve on the container's
    loopback, and the limits it reports are the container's."""
    model = save(tiny_mlp(), tmp_path / "source.onnx")
    mounted = readable_copy(model, tmp_path / "models" / "tiny.onnx")
    result = containers.run_once(
        "--memory=512m", "--cpus=1", "--volume", f"{mounted.parent}:/models:ro",
        "--entrypoint=python",
        command=[
            "-m", "agent", "profile", "/models/tiny.onnx", "--target-rps", "20",
            "--max-p99-ms", "2000", "--threads", "1", "--max-batch", "8", "--coalescing", "on",
            "--loads", "1", "--warmup", "0.2", "--duration", "1", "--out", "/tmp/profile.json",
            "--json",
        ],
    )  # fmt: skip
    document = read_profile(result.stdout.strip().splitlines()[-1])
    assert document.recommendation.met, result.stderr[-2000:]
    full = json.loads(result.stdout.strip().splitlines()[-1])
    assert full["host"]["limits"]["memory_limit_bytes"] == 512 << 20
    assert full["host"]["limits"]["cpu_quota_cores"] == 1.0
    assert document.recommendation.createOptions.HostConfig.Memory < 512 << 20
    assert "[1/1]" in result.stderr  # progress on stderr

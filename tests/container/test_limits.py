"""Limits read inside the real container: `docker run --memory --cpus` reach the agent."""

from __future__ import annotations

import json

import pytest

from tests.support.docker import BUILD_TIMEOUT_S, Containers

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

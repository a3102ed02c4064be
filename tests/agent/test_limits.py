"""Container limits from fixture cgroup trees (v1, v2, none), and the parsers as tables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import pytest

from agent.observation.limits import (
    Limits,
    default_intra_op_threads,
    parse_cpu_max,
    parse_memory_max,
    parse_proc_cgroup,
    parse_v1_cpu,
    parse_v1_memory,
    read_limits,
    read_memory_free,
)
from agent.settings import AgentSettings
from agent.standalone import Agent

GIB = 1 << 30


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


V2_CONTAINER = {  # docker --memory 512m --cpus 1.5, cgroup namespace private
    "proc/self/cgroup": "0::/\n",
    "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
    "sys/fs/cgroup/memory.max": f"{512 << 20}\n",
    "sys/fs/cgroup/cpu.max": "150000 100000\n",
}
V2_HOST_UNLIMITED = {
    "proc/self/cgroup": "0::/user.slice/user-0.slice/session-1.scope\n",
    "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
    "sys/fs/cgroup/user.slice/memory.max": "max\n",
    "sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
    "sys/fs/cgroup/user.slice/user-0.slice/session-1.scope/memory.max": "max\n",
}
V2_PARENT_BINDS = {  # the slice limits memory, the scope limits CPU: each lowest one counts
    "proc/self/cgroup": "0::/edge.slice/agent.scope\n",
    "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
    "sys/fs/cgroup/edge.slice/memory.max": f"{GIB}\n",
    "sys/fs/cgroup/edge.slice/cpu.max": "max 100000\n",
    "sys/fs/cgroup/edge.slice/agent.scope/memory.max": f"{2 * GIB}\n",
    "sys/fs/cgroup/edge.slice/agent.scope/cpu.max": "50000 100000\n",
}
V1_CONTAINER = {  # host cgroup namespace: /proc/self/cgroup names a path the container lacks
    "proc/self/cgroup": (
        "12:memory:/docker/0123abcd\n4:cpu,cpuacct:/docker/0123abcd\n1:name=systemd:/docker/0123abcd\n"
    ),
    "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{256 << 20}\n",
    "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "25000\n",
    "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
}
V1_UNLIMITED = {
    "proc/self/cgroup": "12:memory:/\n4:cpu,cpuacct:/\n",
    "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
    "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (V2_CONTAINER, Limits("v2", 512 << 20, 1.5, 4)),
        (V2_HOST_UNLIMITED, Limits("v2", None, None, 4)),
        (V2_PARENT_BINDS, Limits("v2", GIB, 0.5, 4)),
        (V1_CONTAINER, Limits("v1", 256 << 20, 0.25, 4)),
        (V1_UNLIMITED, Limits("v1", None, None, 4)),
        ({"proc/self/cgroup": ""}, Limits("none", None, None, 4)),
        ({}, Limits("none", None, None, 4)),
    ],
    ids=[
        "v2-container",
        "v2-unlimited",
        "v2-parent",
        "v1-container",
        "v1-unlimited",
        "none",
        "no-proc",
    ],
)
def test_limits_are_read_from_the_cgroup_tree(
    tmp_path: Path, files: Mapping[str, str], expected: Limits
) -> None:
    assert read_limits(_tree(tmp_path, files), cpus_allowed=4) == expected


@pytest.mark.parametrize(
    ("limits", "cpus", "threads"),
    [
        (Limits("none", None, None, 1), 1.0, 1),
        (Limits("none", None, None, 2), 2.0, 1),
        (Limits("none", None, None, 8), 8.0, 7),
        (Limits("v2", None, 1.5, 8), 1.5, 1),  # fractional quota: whole cores only
        (Limits("v2", None, 0.25, 8), 0.25, 1),
        (Limits("v2", None, 4.0, 8), 4.0, 3),
        (Limits("v2", None, 6.0, 2), 2.0, 1),  # the cpuset caps a larger quota
        (Limits("v1", None, 2.9999999999, 8), 2.9999999999, 2),  # float noise: 3 cores
    ],
)
def test_threads_default_from_the_cpu_quota_not_the_host(
    limits: Limits, cpus: float, threads: int
) -> None:
    assert limits.cpus == pytest.approx(cpus)
    assert default_intra_op_threads(limits) == threads


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max\n", None), ("536870912\n", 536870912), ("0", 0)],
)
def test_memory_max(text: str, expected: int | None) -> None:
    assert parse_memory_max(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000", None), ("150000 100000\n", 1.5), ("50000 200000", 0.25), ("200000", 2.0)],
)
def test_cpu_max(text: str, expected: float | None) -> None:
    assert parse_cpu_max(text) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("-1", "100000", None), ("150000", "100000", 1.5), ("1000", "100000", 0.01)],
)
def test_v1_cpu(quota: str, period: str, expected: float | None) -> None:
    assert parse_v1_cpu(quota, period) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("9223372036854771712\n", None), ("268435456\n", 268435456)],
)
def test_v1_memory(text: str, expected: int | None) -> None:
    assert parse_v1_memory(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_memory_max, "lots", "memory.max must be an integer"),
        (parse_memory_max, "-5", "must not be negative"),
        (parse_cpu_max, "", "cpu.max must be"),
        (parse_cpu_max, "100 0", "period of 0"),
        (parse_v1_memory, "", "memory.limit_in_bytes must be an integer"),
    ],
)
def test_malformed_files_name_what_was_wrong(parse: object, text: str, message: str) -> None:
    assert callable(parse)
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_proc_cgroup_maps_each_controller_to_its_path() -> None:
    paths = parse_proc_cgroup("4:cpu,cpuacct:/a\n1:name=systemd:/b\n0::/c\nnonsense\n")
    assert paths == {
        "cpu": PurePosixPath("/a"),
        "cpuacct": PurePosixPath("/a"),
        "systemd": PurePosixPath("/b"),
        "": PurePosixPath("/c"),
    }


@pytest.mark.parametrize(
    ("environ", "limits", "threads"),
    [
        ({}, Limits("v2", None, 4.0, 16), 3),  # the quota, not the host's 16 cores
        ({}, Limits("v1", None, 0.5, 16), 1),
        ({"EDGEML_INTRA_OP_THREADS": "6"}, Limits("v2", None, 4.0, 16), 6),  # set: kept
    ],
)
def test_the_agent_takes_its_thread_count_from_the_cpu_limit_unless_set(
    environ: dict[str, str], limits: Limits, threads: int
) -> None:
    settings = AgentSettings.from_environment(environ)
    assert settings.runtime.for_limits(limits).intra_op_threads == threads
    agent = Agent(settings.model_copy(update={"model_path": Path("m.onnx")}), limits=limits)
    assert agent.settings.runtime.intra_op_threads == threads  # what every load then uses


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({**V2_CONTAINER, "sys/fs/cgroup/memory.current": f"{100 << 20}\n"}, 412 << 20),
        (  # the slice has less left than the scope's own limit
            {
                **V2_PARENT_BINDS,
                "sys/fs/cgroup/edge.slice/memory.current": f"{GIB - (50 << 20)}\n",
                "sys/fs/cgroup/edge.slice/agent.scope/memory.current": f"{300 << 20}\n",
            },
            50 << 20,
        ),
        ({**V2_CONTAINER, "sys/fs/cgroup/memory.current": f"{GIB}\n"}, 0),  # past it: none
        (
            {**V1_CONTAINER, "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{56 << 20}\n"},
            200 << 20,
        ),
        (V2_HOST_UNLIMITED, None),
        ({"proc/self/cgroup": "0::/\n"}, None),  # no cgroup filesystem
    ],
)
def test_memory_free_is_the_least_left_under_any_limit_on_the_way_up(
    tmp_path: Path, files: Mapping[str, str], expected: int | None
) -> None:
    assert read_memory_free(_tree(tmp_path, files)) == expected

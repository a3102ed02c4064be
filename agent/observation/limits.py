"""The container's resource limits, read from cgroup v2 or v1 under an injectable root.

IoT Edge starts the agent with `createOptions.HostConfig.Memory` and `NanoCpus`, which the
engine writes to the container's cgroup; `os.cpu_count()` still reports the host's cores. So
thread counts and the memory headroom come from here: the lowest limit on the way from the
process's cgroup up to the hierarchy's root (a parent's limit binds its children too), and the
CPU affinity mask (`--cpuset-cpus`).

Parsers are pure functions of the files' text; `read_limits` does the reading, from `root`
(`/` in production, a fixture tree in tests).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

CgroupVersion = Literal["v1", "v2", "none"]

# cgroup v1 reports "no limit" as the largest page-aligned 63-bit number; anything this large
# is no limit a device could have.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class Limits:
    """What the agent may use; None where nothing limits it."""

    cgroup: CgroupVersion
    memory_bytes: int | None
    cpu_quota_cores: float | None
    cpus_allowed: int

    @property
    def cpus(self) -> float:
        """Cores the process can use at once: the quota, capped by the CPUs it may run on."""
        if self.cpu_quota_cores is None:
            return float(self.cpus_allowed)
        return min(self.cpu_quota_cores, float(self.cpus_allowed))

    def as_json(self) -> dict[str, object]:
        return {
            "cgroup": self.cgroup,
            "memory_limit_bytes": self.memory_bytes,
            "cpu_quota_cores": None
            if self.cpu_quota_cores is None
            else round(self.cpu_quota_cores, 3),
            "cpus_allowed": self.cpus_allowed,
            "cpus": round(self.cpus, 3),
        }


def default_intra_op_threads(limits: Limits) -> int:
    """ONNX Runtime's intra-op threads when none are set: whole cores of the quota, less one.

    The event loop decodes and answers requests on a core of its own under load, so a model
    that takes every core makes requests wait for the loop (and a quota below the thread count
    gets the container throttled mid-call). At least one thread, as on a 1- or 2-core device.
    """
    return max(1, math.floor(limits.cpus + 1e-9) - 1)


def parse_proc_cgroup(text: str) -> dict[str, PurePosixPath]:
    """`/proc/self/cgroup` as {controller: path}; the v2 unified line is under the key ""."""
    paths: dict[str, PurePosixPath] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hierarchy, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller.removeprefix("name=")] = PurePosixPath(path or "/")
    return paths


def parse_memory_max(text: str) -> int | None:
    """v2 `memory.max`: bytes, or `max` for no limit."""
    value = text.strip()
    return None if value == "max" else _non_negative_int(value, "memory.max")


def parse_cpu_max(text: str) -> float | None:
    """v2 `cpu.max`: `<quota> <period>` in microseconds, quota `max` for no limit; in cores."""
    fields = text.split()
    if not fields or len(fields) > 2:
        raise ValueError(f"cpu.max must be '<quota> <period>', not {text.strip()!r}")
    if fields[0] == "max":
        return None
    period = _non_negative_int(fields[1], "cpu.max period") if len(fields) == 2 else 100_000
    return _cores(_non_negative_int(fields[0], "cpu.max quota"), period)


def parse_v1_memory(text: str) -> int | None:
    """v1 `memory.limit_in_bytes`: bytes; a near-2^63 value means no limit."""
    value = _non_negative_int(text.strip(), "memory.limit_in_bytes")
    return None if value >= _V1_UNLIMITED else value


def parse_v1_cpu(quota_text: str, period_text: str) -> float | None:
    """v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` in cores; quota -1 means no limit."""
    quota = int(quota_text.strip())
    if quota < 0:
        return None
    return _cores(quota, _non_negative_int(period_text.strip(), "cpu.cfs_period_us"))


def _cores(quota_us: int, period_us: int) -> float:
    if period_us == 0:
        raise ValueError("a CPU period of 0 microseconds")
    return quota_us / period_us


def _non_negative_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be an integer, not {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must not be negative, not {value}")
    return value


def _lowest(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return min(known) if known else None


def _chain(mount: Path, path: PurePosixPath) -> list[Path]:
    """Cgroup folders from the process's own up to the mount's root, those that exist.

    Inside a container whose cgroup namespace is the host's (cgroup v1, older engines),
    `/proc/self/cgroup` names a host path (`/docker/<id>`) while the container sees its own
    cgroup mounted at the root, so a path that does not exist falls back to the root.
    """
    relative = path.relative_to("/") if path.is_absolute() else path
    folders = [
        mount / PurePosixPath(*relative.parts[:n]) for n in range(len(relative.parts), 0, -1)
    ]
    existing = [folder for folder in folders if folder.is_dir()]
    return [*existing, mount] if mount.is_dir() else existing


def _read(folder: Path, name: str) -> str | None:
    try:
        return (folder / name).read_text()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def _is_v2(root: Path) -> bool:
    return (root / "sys/fs/cgroup/cgroup.controllers").is_file()


@dataclass(frozen=True, slots=True)
class _MemoryFiles:
    """The cgroup folders whose memory limits bind this process, and the version's files."""

    chain: list[Path]
    limit: str
    usage: str
    parse: Callable[[str], int | None]

    def limits(self) -> list[tuple[Path, int]]:
        """Each folder of the chain that sets a limit, with that limit."""
        return [
            (folder, limit)
            for folder in self.chain
            if (text := _read(folder, self.limit)) is not None
            and (limit := self.parse(text)) is not None
        ]


def _memory_files(root: Path, paths: dict[str, PurePosixPath]) -> _MemoryFiles:
    if _is_v2(root):
        chain = _chain(root / "sys/fs/cgroup", paths.get("", PurePosixPath("/")))
        return _MemoryFiles(chain, "memory.max", "memory.current", parse_memory_max)
    chain = _chain(_v1_mount(root, "memory"), paths.get("memory", PurePosixPath("/")))
    return _MemoryFiles(chain, "memory.limit_in_bytes", "memory.usage_in_bytes", parse_v1_memory)


def _v2_cpu(root: Path, path: PurePosixPath) -> float | None:
    chain = _chain(root / "sys/fs/cgroup", path)
    return _lowest(
        [parse_cpu_max(text) for f in chain if (text := _read(f, "cpu.max")) is not None]
    )


def _v1_mount(root: Path, controller: str) -> Path:
    # Engines mount `cpu,cpuacct` and link `cpu` to it; either name reaches the files.
    base = root / "sys/fs/cgroup"
    for name in (controller, f"{controller},cpuacct", f"cpuacct,{controller}"):
        if (base / name).is_dir():
            return base / name
    return base / controller


def _v1_cpu(root: Path, path: PurePosixPath) -> float | None:
    cpu: list[float | None] = []
    for folder in _chain(_v1_mount(root, "cpu"), path):
        quota, period = _read(folder, "cpu.cfs_quota_us"), _read(folder, "cpu.cfs_period_us")
        if quota is not None and period is not None:
            cpu.append(parse_v1_cpu(quota, period))
    return _lowest(cpu)


def read_memory_free(root: Path = Path("/")) -> int | None:
    """Bytes left now under the memory limits on the way up from this process's cgroup: the
    least of limit - usage (page cache included, as the kernel counts it); None if unlimited."""
    files = _memory_files(root, parse_proc_cgroup(_read(root / "proc/self", "cgroup") or ""))
    free = [
        limit - _non_negative_int(usage.strip(), files.usage)
        for folder, limit in files.limits()
        if (usage := _read(folder, files.usage)) is not None
    ]
    return max(min(free), 0) if free else None


def read_limits(root: Path = Path("/"), cpus_allowed: int | None = None) -> Limits:
    """The limits of this process's cgroup, read under `root`.

    `cpus_allowed` defaults to the process's CPU affinity (the cpuset it may run on).
    """
    if cpus_allowed is None:
        cpus_allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    paths = parse_proc_cgroup(_read(root / "proc/self", "cgroup") or "")
    limits = [limit for _, limit in _memory_files(root, paths).limits()]
    memory = min(limits) if limits else None
    if _is_v2(root):
        return Limits("v2", memory, _v2_cpu(root, paths.get("", PurePosixPath("/"))), cpus_allowed)
    if (root / "sys/fs/cgroup/memory").is_dir() or (root / "sys/fs/cgroup/cpu").exists():
        cpu = _v1_cpu(root, paths.get("cpu", PurePosixPath("/")))
        return Limits("v1", memory, cpu, cpus_allowed)
    return Limits("none", None, None, cpus_allowed)

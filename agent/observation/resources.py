"""The agent's resources against the container's limits: gauges, readings, the headroom alarm.

client_python's `process_*` metrics already give CPU seconds, resident memory and open file
descriptors; these add what they lack: the cgroup's limits, the headroom left under the memory
limit, threads, and the resident high-water mark (`VmHWM`) that the OOM killer's verdict
depends on more than any one reading.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from agent.observation.limits import Limits

SAMPLE_INTERVAL_S = 0.005


def parse_vm_hwm(status: str) -> int | None:
    """`VmHWM` of `/proc/<pid>/status` in bytes, or None when absent."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmHWM in {unit!r}, expected kB")
            return int(value) * 1024
    return None


def read_vm_hwm(pid: int | str = "self", proc_root: Path = Path("/proc")) -> int | None:
    """The process's resident high-water mark, or None where `/proc` does not tell."""
    try:
        return parse_vm_hwm((proc_root / str(pid) / "status").read_text())
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Resources:
    """One reading of the process against its limits."""

    rss_bytes: int
    peak_rss_bytes: int | None
    threads: int
    open_files: int
    cpu_seconds: float
    limits: Limits

    @property
    def headroom_bytes(self) -> int | None:
        """Memory left under the limit (negative past it); None without a limit."""
        limit = self.limits.memory_bytes
        return None if limit is None else limit - self.rss_bytes

    def as_json(self) -> dict[str, object]:
        headroom = self.headroom_bytes
        return {
            "rss_mb": _mb(self.rss_bytes),
            "peak_rss_mb": None if self.peak_rss_bytes is None else _mb(self.peak_rss_bytes),
            "threads": self.threads,
            "open_files": self.open_files,
            "memory_limit_mb": None
            if self.limits.memory_bytes is None
            else _mb(self.limits.memory_bytes),
            "memory_headroom_mb": None if headroom is None else _mb(headroom),
            "cpus": round(self.limits.cpus, 3),
            "cgroup": self.limits.cgroup,
        }


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


def read_resources(
    process: psutil.Process, limits: Limits, proc_root: Path = Path("/proc")
) -> Resources:
    with process.oneshot():
        times = process.cpu_times()
        rss = int(process.memory_info().rss)
        threads = process.num_threads()
        try:
            open_files = process.num_fds()
        except AttributeError:  # not on Linux
            open_files = len(process.open_files())
    return Resources(
        rss_bytes=rss,
        peak_rss_bytes=read_vm_hwm(process.pid, proc_root),
        threads=threads,
        open_files=open_files,
        cpu_seconds=times.user + times.system,
        limits=limits,
    )


def headroom_low(resources: Resources, was_low: bool, alert_fraction: float) -> bool:
    """Whether headroom is low now: under `alert_fraction` of the limit to raise, and back over
    1.5 times that to clear, so a reading hovering at the threshold does not flap."""
    limit, headroom = resources.limits.memory_bytes, resources.headroom_bytes
    if limit is None or headroom is None:
        return False
    threshold = limit * alert_fraction * (1.5 if was_low else 1.0)
    return headroom < threshold


class ResourceCollector:
    """`<namespace>_memory_limit_bytes`, `_memory_headroom_bytes`, `_cpu_limit_cores`,
    `_threads`, `_resident_memory_peak_bytes`, read at scrape time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str = "agent",
        *,
        limits: Limits,
        process: psutil.Process | None = None,
        proc_root: Path = Path("/proc"),
    ) -> None:
        self._prefix = f"{namespace}_"
        self.limits = limits
        self._process = process or psutil.Process()
        self._proc_root = proc_root
        registry.register(self)

    def read(self) -> Resources:
        return read_resources(self._process, self.limits, self._proc_root)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only: describing would read /proc at register

    def collect(self) -> Iterator[Metric]:
        p = self._prefix
        try:
            now = self.read()
        except psutil.Error:
            return
        if now.limits.memory_bytes is not None and now.headroom_bytes is not None:
            yield GaugeMetricFamily(
                f"{p}memory_limit_bytes",
                "The container's memory limit (cgroup); absent without one.",
                value=now.limits.memory_bytes,
            )
            yield GaugeMetricFamily(
                f"{p}memory_headroom_bytes",
                "Memory limit minus resident memory: what a swap's candidate may still take.",
                value=now.headroom_bytes,
            )
        yield GaugeMetricFamily(
            f"{p}cpu_limit_cores",
            "Cores the agent may use: the cgroup's CPU quota capped by its CPU set.",
            value=now.limits.cpus,
        )
        yield GaugeMetricFamily(f"{p}threads", "Threads of the agent's process.", value=now.threads)
        if now.peak_rss_bytes is not None:
            yield GaugeMetricFamily(
                f"{p}resident_memory_peak_bytes",
                "The process's resident high-water mark (VmHWM) since it started.",
                value=now.peak_rss_bytes,
            )


class PeakMemory:
    """Peak resident memory of one process over windows; `proc_root` is `/proc` by default."""

    def __init__(self, pid: int, proc_root: Path = Path("/proc")) -> None:
        self._process = psutil.Process(pid)
        self._status = proc_root / str(pid) / "status"
        self._clear_refs = proc_root / str(pid) / "clear_refs"
        self.sampled_peak = 0
        self.hwm_resets = True

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def reset(self) -> None:
        """Start a window: the kernel's high-water mark and the sampled maximum restart."""
        if self.hwm_resets:
            try:
                self._clear_refs.write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self.hwm_resets = False
        self.sampled_peak = self.rss()

    def sample(self) -> None:
        self.sampled_peak = max(self.sampled_peak, self.rss())

    def peak(self) -> int:
        """The window's peak: the high-water mark when it could be reset, else the samples."""
        self.sample()
        if not self.hwm_resets:
            return self.sampled_peak
        return max(self.sampled_peak, parse_vm_hwm(self._status.read_text()) or 0)

    async def sample_forever(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

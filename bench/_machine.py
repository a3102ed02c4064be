"""The machine a benchmark runs on: how busy it is, and stopping the servers it started."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil


def machine_busy() -> float:
    """CPU seconds all cores spent on anything but idling, since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def wait_for_quiet_machine(threshold_cores: float, max_wait_s: float) -> float:
    """Wait (bounded) until other work uses under `threshold_cores`; return the last reading.

    The machine may be shared (CI, other builds); starting a server into a busy second's worth
    of someone else's compile only adds noise that the rounds must then average away.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy()
        time.sleep(1.0)
        busy = machine_busy() - before
        if busy < threshold_cores or time.monotonic() > deadline:
            return round(busy, 2)


def stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, as a container runtime would; SIGKILL if it outlives the grace."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

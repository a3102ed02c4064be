"""The Docker command line, and an engine shared by every session on the machine.

Where no engine runs, `dockerd` is started (no bridge, no iptables: containers use the host's
network). Sessions that use it (tests, `make image`, the demo, benchmarks) each hold a lease;
the last to leave stops the engine if one of them started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path


class ImageError(Exception):
    """The engine, the base or the build failed; `reason` is one word from a closed set."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Docker:
    """The `docker` command line (the only way this project talks to the engine)."""

    binary: str = "docker"
    timeout_s: float = 900.0

    def __call__(
        self, *args: str, check: bool = True, timeout_s: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s or self.timeout_s,
            check=False,
        )
        if check and done.returncode != 0:
            raise ImageError(
                "docker_failed",
                f"docker {args[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}",
            )
        return done

    def engine_answers(self) -> bool:
        try:
            return self("info", "--format", "{{.ID}}", check=False, timeout_s=20).returncode == 0
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return False

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False, timeout_s=30).returncode == 0


# Sessions that use an engine (tests, `make image`, the demo, benchmarks) may overlap, on one
# machine and one engine. Each holds a lease while it runs; the last to leave stops the engine
# if one of them started it, so none stops it under another's build or containers.
SHARED_DIR = Path(tempfile.gettempdir()) / "edge-mlops-docker"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        # A dockerd started here is this process's child: reap it once it exits, or its zombie
        # would answer the signal below as if it still ran.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not a child of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inheritable_descriptors() -> list[int]:
    """Descriptors beyond stdio that a child would inherit: a long-lived engine holding a
    caller's pipe open (a CI runner's, a make jobserver's) would keep that caller waiting."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):  # the descriptor listdir itself used is gone
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
    return found


def log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of dockerd's log, for an error that must explain itself in CI output;
    gRPC's connection chatter is left out (it repeats every second while containerd starts)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if "module=grpc" not in line][-lines:])


def process_identity(pid: int) -> str | None:
    """Which process `pid` is: the boot and its start time (a pid alone is reused, and a lease
    left in /tmp by a killed session must not pass for a process that runs now)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces; the start
    # time is field 22 of the whole line.
    return f"{boot} {stat.rpartition(')')[2].split()[19]}"


def live_leases(
    leases: Mapping[str, str], identity: Callable[[int], str | None] = process_identity
) -> list[str]:
    """The leases (file name: a pid; content: that process's identity) whose process runs."""
    return [
        name
        for name, held_by in leases.items()
        if name.isdigit() and held_by and identity(int(name)) == held_by
    ]


@dataclass
class Engine:
    """A lease on a Docker engine: `start()` starts `dockerd` when none answers; `stop()` stops
    it when this was the last lease and a lease holder started it."""

    docker: Docker
    log_path: Path
    start_timeout_s: float = 180.0
    start_attempts: int = 5
    dockerd: str = "dockerd"
    shared_dir: Path = SHARED_DIR
    started_here: bool = False

    @property
    def _lease(self) -> Path:
        return self.shared_dir / "leases" / str(os.getpid())

    @property
    def _marker(self) -> Path:
        return self.shared_dir / "dockerd.pid"  # the pid file of a dockerd started here

    def start(self) -> None:
        with locked(self.shared_dir / "lock"):
            self._lease.parent.mkdir(parents=True, exist_ok=True)
            self._lease.write_text(process_identity(os.getpid()) or "")
            if self.docker.engine_answers():
                return
            self._start_dockerd()

    def _start_dockerd(self) -> None:
        dockerd = shutil.which(self.dockerd)
        if dockerd is None:
            raise ImageError(
                "no_engine",
                "no Docker engine answers and dockerd is not installed "
                "(`make system-deps` installs Debian's docker.io)",
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.start_timeout_s
        # On a machine just booted from a cold disk, dockerd has given up on its own containerd
        # ("timeout waiting for containerd to start", after 15 s) and exited; a second start
        # finds the binaries in memory.
        for _ in range(self.start_attempts):
            if self._launch_and_wait(dockerd, deadline):
                self.started_here = True
                return
        raise ImageError(
            "engine_failed",
            f"dockerd exited {self.start_attempts} times; the end of {self.log_path}:\n"
            f"{log_tail(self.log_path)}",
        )

    def _launch_and_wait(self, dockerd: str, deadline: float) -> bool:
        """Start dockerd and wait until it answers (True) or exits (False)."""
        self._marker.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            # In a session of its own: the engine may outlive this process while another lease
            # holder uses it. No bridge and no iptables: the machine allows no network but
            # loopback, and containers use the host's network namespace.
            pid = os.posix_spawn(
                dockerd,
                [dockerd, "--bridge=none", "--iptables=false", f"--pidfile={self._marker}"],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
                    *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_descriptors()),
                ],
                setsid=True,
            )
        while not self.docker.engine_answers():
            if not _alive(pid):
                return False
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGTERM)
                raise ImageError(
                    "engine_failed",
                    f"dockerd did not answer in {self.start_timeout_s:.0f} s; the end of "
                    f"{self.log_path}:\n{log_tail(self.log_path)}",
                )
            time.sleep(0.3)
        return True

    def stop(self, grace_s: float = 30.0) -> None:
        with locked(self.shared_dir / "lock"):
            self._lease.unlink(missing_ok=True)
            leases = self.shared_dir / "leases"
            held = {lease.name: lease.read_text() for lease in leases.glob("*")}
            if live_leases(held):
                return
            if not self._marker.is_file():
                return  # an engine nobody here started: not ours to stop
            pid = int(self._marker.read_text().strip() or 0)
            if pid <= 1 or not _alive(pid):
                return
            os.kill(pid, signal.SIGTERM)  # dockerd removes its pid file as it exits
            deadline = time.monotonic() + grace_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_engine(docker: Docker, log_path: Path) -> Iterator[Engine]:
    engine = Engine(docker, log_path)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()

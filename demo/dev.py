"""A local fleet left running for a developer: `python -m deployment dev up|down|status`.

    python -m demo.dev up [--run-dir run/dev] [--reset]
    python -m demo.dev status [--run-dir run/dev]
    python -m demo.dev down [--run-dir run/dev]

`up` starts, in the background, the demo's world (`demo.world`: Azurite over HTTPS, the
simulated hub with three devices in two rings, one `python -m module` agent per device), writes
the publisher's `edgeml.toml` with a `dev` environment and its secrets under the run folder,
waits until every agent answers, prints what to run next and gives the shell back. The process
that holds the world writes its pid to `dev.pid`; `down` stops it (and with it every agent,
the hub and Azurite), `status` says what runs.

It lives here, not under `deployment/`, because it assembles the simulator, the agents and the
publisher's environment, and the import contracts keep those packages apart:
`python -m deployment dev` starts this module as a process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from demo.world import FLEET, MODEL, RINGS, World, start_world
from deployment import config as publisher_config

DEFAULT_RUN_DIR = Path("run") / "dev"
ENVIRONMENT = "dev"
PID_FILE = "dev.pid"
READY_FILE = "dev.json"
LOG_FILE = "dev.log"
START_TIMEOUT_S = 180.0  # Azurite (node) and three agents on a loaded 2-core machine
STOP_TIMEOUT_S = 45.0  # the world stops each agent within 15 s, then the hub and Azurite


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deployment dev", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the local fleet in the background")
    up.add_argument(
        "--reset", action="store_true", help="delete what a previous run left in the folder first"
    )
    commands.add_parser("down", help="stop it")
    commands.add_parser("status", help="say what runs")
    serve = commands.add_parser("serve", help=argparse.SUPPRESS)  # what `up` runs detached
    del up, serve
    for command in commands.choices.values():
        command.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    return parser


# ------------------------------------------------------------------------------ pids


def running_pid(run_dir: Path) -> int | None:
    """The pid of this run folder's world when it still runs (a stale file says None)."""
    try:
        pid = int((run_dir / PID_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # A pid the kernel reused for another program is not ours to signal.
    return pid if b"demo.dev" in cmdline else None


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


# ------------------------------------------------------------------------------ up


def next_steps(run_dir: Path, ready: dict[str, Any]) -> list[str]:
    """The commands that publish a model to the local fleet, as the user types them (pure)."""
    publisher = f"python -m deployment --config {run_dir / 'edgeml.toml'} --env {ENVIRONMENT}"
    first = next(iter(ready["agents"].items()))
    return [
        "# the publisher's HTTPS client must trust Azurite's (and the hub's) throw-away CA:",
        f"export REQUESTS_CA_BUNDLE={run_dir / 'ca-bundle.pem'}",
        f"{publisher} register model.onnx --name {MODEL} --metrics metrics.json "
        "--baseline baseline.json",
        f"{publisher} upload {MODEL}:1",
        f"{publisher} sign {MODEL}:1",
        "# no traffic reaches the devices yet: accept a probation that saw none",
        f"{publisher} release {MODEL}:1 --rings {','.join(RINGS)} --allow-no-traffic",
        f"{publisher} status",
        f"curl -s http://127.0.0.1:{first[1]}/v2   # {first[0]}'s agent",
        f"python -m deployment dev down --run-dir {run_dir}",
    ]


def up(run_dir: Path, out: TextIO, *, reset: bool) -> int:
    pid = running_pid(run_dir)
    if pid is not None:
        out.write(f"already running (pid {pid}) in {run_dir}\n")
        return _print_ready(run_dir, out)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not reset:
            out.write(
                f"{run_dir} holds what a previous run left (its hub's CA, keys and devices); "
                "the simulator does not reload them yet: `dev up --reset` deletes the folder "
                "and starts afresh, or pass another --run-dir\n"
            )
            return 2
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (run_dir / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 -- this interpreter, this module
            [sys.executable, "-m", "demo.dev", "serve", "--run-dir", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the shell's Ctrl-C and hang-up do not reach it
        )
    while not (run_dir / READY_FILE).exists():
        if process.poll() is not None:
            out.write(
                f"dev up failed (exit {process.returncode}); its log, {run_dir / LOG_FILE}:\n"
            )
            out.write(_tail(run_dir / LOG_FILE))
            return 1
        if time.monotonic() - started > START_TIMEOUT_S:
            os.killpg(process.pid, signal.SIGTERM)
            out.write(f"dev up: not ready after {START_TIMEOUT_S:g} s; see {run_dir / LOG_FILE}\n")
            return 1
        time.sleep(0.2)
    out.write(f"dev environment up in {time.monotonic() - started:.1f} s (pid {process.pid})\n")
    return _print_ready(run_dir, out)


def _print_ready(run_dir: Path, out: TextIO) -> int:
    ready = json.loads((run_dir / READY_FILE).read_text(encoding="utf-8"))
    for device, port in ready["agents"].items():
        out.write(f"  {device}: agent on http://127.0.0.1:{port}\n")
    out.write("next:\n")
    out.writelines(f"  {line}\n" for line in next_steps(run_dir, ready))
    return 0


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "".join(path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-lines:])
    return ""


# ------------------------------------------------------------------------------ down, status


def down(run_dir: Path, out: TextIO) -> int:
    pid = running_pid(run_dir)
    if pid is None:
        out.write(f"nothing runs in {run_dir}\n")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running_pid(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    if running_pid(run_dir) is not None:
        # Its session: the agents, the hub's thread and Azurite go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        out.write(f"killed pid {pid} after {STOP_TIMEOUT_S:g} s\n")
    (run_dir / PID_FILE).unlink(missing_ok=True)
    out.write(f"stopped (pid {pid})\n")
    return 0


def status(run_dir: Path, out: TextIO) -> int:
    pid = running_pid(run_dir)
    if pid is None:
        out.write(f"not running in {run_dir}\n")
        return 3
    try:
        ready = json.loads((run_dir / READY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        out.write(f"starting (pid {pid}); log {run_dir / LOG_FILE}\n")
        return 0
    out.write(f"running (pid {pid}) since {ready['started']}: hub {ready['hub']}\n")
    for device, port in ready["agents"].items():
        alive = _answers(f"http://127.0.0.1:{port}/v2/health/live")
        out.write(f"  {device}: agent :{port} {'live' if alive else 'not answering'}\n")
    return 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 -- loopback
            return int(response.status) == 200
    except (OSError, urllib.error.URLError):
        return False


# ------------------------------------------------------------------------------ serve


def serve(run_dir: Path) -> int:
    """Hold the world until SIGTERM: what `up` runs in the background."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _write_atomic(run_dir / PID_FILE, f"{os.getpid()}\n")
    world = start_world(run_dir, ENVIRONMENT)
    try:
        _write_secrets(world)
        for device in FLEET:
            world.start_agent(device)
        for agent in world.agents.values():
            _wait_live(agent.http_port, agent.process, stop)
        ready = {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hub": world.sim.service_hostname,
            "agents": {device: agent.http_port for device, agent in world.agents.items()},
        }
        _write_atomic(run_dir / READY_FILE, json.dumps(ready, indent=2) + "\n")
        stop.wait()
    finally:
        world.stop()
        (run_dir / READY_FILE).unlink(missing_ok=True)
        (run_dir / PID_FILE).unlink(missing_ok=True)
    return 0


def _write_secrets(world: World) -> None:
    """The hub's and storage's connection strings next to the signing key, in the secrets
    folder edgeml.toml names: the publisher's commands need no variables."""
    secrets_dir = world.run_dir / "secrets"
    for variable in (publisher_config.HUB_SECRET, publisher_config.STORAGE_SECRET):
        path = secrets_dir / variable.lower()
        path.write_text(world.environ[variable] + "\n", encoding="utf-8")
        path.chmod(0o600)


def _wait_live(port: int, process: subprocess.Popen[bytes] | None, stop: threading.Event) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://127.0.0.1:{port}/v2/health/live"
    while not _answers(url):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the agent on port {port} exited with {process.returncode}")
        if stop.is_set() or time.monotonic() > deadline:
            raise RuntimeError(f"the agent on port {port} did not answer {url}")
        time.sleep(0.2)


def run(argv: list[str], out: TextIO) -> int:
    args = _parser().parse_args(argv)
    run_dir: Path = args.run_dir
    if args.command == "up":
        return up(run_dir, out, reset=args.reset)
    if args.command == "down":
        return down(run_dir, out)
    if args.command == "status":
        return status(run_dir, out)
    return serve(run_dir)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], sys.stdout))

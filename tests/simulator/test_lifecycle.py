"""Starting and stopping: nothing left running, nothing written outside the run folder."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from simulator import Simulator, pick_loopback_host
from tests.simulator.conftest import DEVICE


def test_stop_leaves_no_thread_and_can_be_called_twice(
    tmp_path: Path, manifest: dict[str, Any]
) -> None:
    before = set(threading.enumerate())
    sim = Simulator.start(manifest, host=pick_loopback_host(), run_dir=tmp_path / "run")
    assert set(threading.enumerate()) - before
    sim.stop()
    sim.stop()
    assert set(threading.enumerate()) == before


def test_everything_written_stays_in_the_run_folder(
    tmp_path: Path, manifest: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    with Simulator.start(manifest, host=pick_loopback_host(), run_dir=run_dir):
        pass
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert written == [
        "run",
        "run/certs",
        "run/certs/ca.pem",
        "run/certs/server-key.pem",
        "run/certs/server.pem",
        "run/simulator.env",
        "run/simulator.json",
    ]
    assert (run_dir / "certs" / "server-key.pem").stat().st_mode & 0o077 == 0


def test_a_busy_port_fails_the_start_with_the_reason(
    tmp_path: Path, manifest: dict[str, Any]
) -> None:
    host = pick_loopback_host()
    with socket.socket() as squatter:
        squatter.bind((host, 8883))
        squatter.listen()
        with pytest.raises(RuntimeError, match="failed to start"):
            Simulator.start(manifest, host=host, run_dir=tmp_path / "run")


def test_calls_after_stop_are_refused(tmp_path: Path, manifest: dict[str, Any]) -> None:
    sim = Simulator.start(manifest, host=pick_loopback_host(), run_dir=tmp_path / "run")
    sim.stop()
    with pytest.raises(RuntimeError, match="not running"):
        sim.twin(DEVICE, "producer")


def test_extra_modules_get_identities_and_empty_twins(
    tmp_path: Path, manifest: dict[str, Any]
) -> None:
    with Simulator.start(
        manifest, host=pick_loopback_host(), run_dir=tmp_path / "run", extra_modules=("tester",)
    ) as sim:
        assert (DEVICE, "tester") in sim.modules
        assert sim.twin(DEVICE, "tester")["properties"]["desired"] == {"$version": 1}
        assert "ModuleId=tester;" in sim.module_connection_string(DEVICE, "tester")

"""`dev up|down|status` without starting anything: the run folder's pid file and its guards."""

from __future__ import annotations

import io
import os
from pathlib import Path

from demo import dev
from demo.world import MODEL


def test_up_refuses_a_folder_a_previous_run_left_without_reset(tmp_path: Path) -> None:
    (tmp_path / "edgeml.toml").write_text("# from the last run\n", encoding="utf-8")
    out = io.StringIO()
    assert dev.up(tmp_path, out, reset=False) == 2
    assert "--reset" in out.getvalue()
    assert not (tmp_path / dev.PID_FILE).exists()  # nothing was started
    assert (tmp_path / "edgeml.toml").exists()  # nor deleted


def test_a_pid_file_of_another_program_is_not_ours_to_signal(tmp_path: Path) -> None:
    # This test's own process runs, but it is pytest, not `demo.dev serve`.
    (tmp_path / dev.PID_FILE).write_text(f"{os.getpid()}\n", encoding="utf-8")
    assert dev.running_pid(tmp_path) is None
    out = io.StringIO()
    assert dev.down(tmp_path, out) == 0
    assert "nothing runs" in out.getvalue()
    assert dev.status(tmp_path, out) == 3


def test_next_steps_name_the_run_folders_config_and_the_first_agent(tmp_path: Path) -> None:
    steps = dev.next_steps(tmp_path, {"agents": {"plant-1": 40001, "plant-2": 40002}})
    config = f"--config {tmp_path / 'edgeml.toml'} --env dev"
    assert any(line.endswith(f"{config} upload {MODEL}:1") for line in steps)
    assert any("release" in line and "--rings canary,all" in line for line in steps)
    assert any(line.startswith("curl -s http://127.0.0.1:40001/v2") for line in steps)

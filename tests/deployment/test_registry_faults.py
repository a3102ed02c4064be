"""The registry's database under faults: locked, read-only, missing. Each is one line naming
the file and a bounded reason, never a SQLAlchemy traceback, and a failed write is audited."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployment.errors import Reason
from deployment.publish.audit import AuditLog
from deployment.publish.registry import failure_reason
from tests.deployment.conftest import Workspace


@pytest.fixture
def own_db(workspace: Workspace, mlflow_db: Path, tmp_path: Path) -> Path:
    """A copy of the session's database (its tables made once), this test's to break."""
    (tmp_path / "db").mkdir()
    copy = tmp_path / "db" / "mlflow.db"
    shutil.copyfile(mlflow_db, copy)
    workspace.mlflow_db = copy
    workspace.write_config()
    return copy


def _one_error_line(err: str, reason: Reason) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"edgeml: error [{reason}]: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("(sqlite3.OperationalError) database is locked", Reason.LOCKED),
        ("(sqlite3.OperationalError) attempt to write a readonly database", Reason.READ_ONLY),
        ("[Errno 30] Read-only file system: '/m/x'", Reason.READ_ONLY),
        ("(sqlite3.OperationalError) unable to open database file", Reason.UNREACHABLE),
        ("", Reason.UNREACHABLE),
    ],
)
def test_a_database_error_s_text_gives_its_reason(text: str, reason: Reason) -> None:
    assert failure_reason(text) == reason


@pytest.mark.parametrize("argv", [["list"], ["show", "m"], ["history", "m"]])
def test_a_read_refuses_a_database_that_does_not_exist(
    workspace: Workspace, tmp_path: Path, argv: list[str]
) -> None:
    typo = tmp_path / "mlfow.db"
    workspace.mlflow_db = typo
    workspace.write_config()
    result = workspace.cli(*argv)
    assert result.code == 1
    line = _one_error_line(result.err, Reason.NOT_FOUND)
    assert f"no MLflow database {typo}" in line
    assert not typo.exists()


def test_register_creates_a_missing_database_and_says_so(
    workspace: Workspace, tmp_path: Path, tiny_file: Path
) -> None:
    fresh = tmp_path / "fresh.db"
    workspace.mlflow_db = fresh
    workspace.write_config()
    result = workspace.cli(
        "register", str(tiny_file), "--name", "fresh", "--metrics", str(workspace.metrics)
    )
    assert result.code == 0, result.err
    assert f"edgeml: notice: created a new MLflow database sqlite:///{fresh}" in result.err
    assert "registered fresh:1" in result.out
    assert workspace.cli("list").code == 0


@contextlib.contextmanager
def _exclusive(database: Path) -> Iterator[None]:
    """Another process's write transaction, as a second publisher mid-register holds it."""
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


def test_a_locked_database_is_one_line_and_the_failed_register_is_audited(
    workspace: Workspace, own_db: Path, tiny_file: Path
) -> None:
    with _exclusive(own_db):
        result = workspace.cli(
            "register", str(tiny_file), "--name", "locked", "--metrics", str(workspace.metrics)
        )
    assert result.code == 1
    line = _one_error_line(result.err, Reason.LOCKED)
    assert f"MLflow database {own_db} is locked" in line
    failed = [e for e in AuditLog(workspace.audit).entries() if e.outcome == "failed"]
    assert [(e.action, e.subject, e.details["reason"]) for e in failed] == [
        ("register", "locked", "locked")
    ]


@contextlib.contextmanager
def _read_only(database: Path) -> Iterator[None]:
    """Root ignores file modes: the immutable attribute binds root too (chattr +i); anyone
    else gets a 0444 file in a 0555 folder."""
    if os.geteuid() != 0:
        database.chmod(0o444)
        database.parent.chmod(0o555)
        try:
            yield
        finally:
            database.parent.chmod(0o755)
            database.chmod(0o644)
        return
    done = subprocess.run(["chattr", "+i", str(database)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot make {database} immutable: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)


def test_a_read_only_database_still_reads_and_refuses_a_write_naming_the_file(
    workspace: Workspace, own_db: Path, tiny_file: Path
) -> None:
    with _read_only(own_db):
        listed = workspace.cli("list")
        result = workspace.cli(
            "register", str(tiny_file), "--name", "ro", "--metrics", str(workspace.metrics)
        )
    assert listed.code == 0, listed.err
    assert result.code == 1
    line = _one_error_line(result.err, Reason.READ_ONLY)
    assert f"MLflow database {own_db} is read-only" in line


@pytest.mark.e2e
def test_a_write_lock_met_mid_register_is_one_line_from_the_process(
    workspace: Workspace, own_db: Path, tiny_file: Path
) -> None:
    """Reads pass, the first write waits out MLflow's busy timeout: MLflow's own handler used
    to print the SQLAlchemy traceback beside the error line."""
    holder = sqlite3.connect(own_db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # readers go on, writers wait
        result = workspace.process(
            "register", str(tiny_file), "--name", "busy", "--metrics", str(workspace.metrics)
        )
    finally:
        holder.close()
    assert result.code == 1
    line = _one_error_line(result.err, Reason.LOCKED)
    assert f"MLflow database {own_db} is locked" in line

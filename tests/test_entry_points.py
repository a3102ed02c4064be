"""Every entry point answers --version and --help as a new user types them (subprocesses,
with no connection settings in the environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

ENTRY_POINTS = ["deployment", "agent", "module", "simulator"]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    # Without the module's connection settings: --help must not need them.
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "EdgeHub", "EDGEML_"))
    }
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ,
    )


@pytest.mark.parametrize("package", ENTRY_POINTS)
def test_version_prints_the_installed_package_version(package: str) -> None:
    done = _run(package, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == metadata.version("edge-mlops-agent")


@pytest.mark.parametrize("package", ENTRY_POINTS)
def test_help_answers_without_any_settings(package: str) -> None:
    done = _run(package, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
    assert "Traceback" not in done.stderr


def test_the_module_help_says_where_its_settings_come_from() -> None:
    done = _run("module", "--help")
    assert "EdgeHubConnectionString" in done.stdout
    assert "IOTEDGE_" in done.stdout

"""Paths of the committed monitoring files and the Debian binaries that check them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

MONITORING: Final = Path(__file__).resolve().parents[2] / "deployment" / "monitoring"
RULES: Final = MONITORING / "rules" / "edge-agent.rules.yml"
RULE_TESTS: Final = MONITORING / "rules" / "edge-agent.rules.test.yml"
ALERTMANAGER: Final = MONITORING / "alertmanager.yml"
AGENT_PROMETHEUS: Final = MONITORING / "prometheus-agent.yml"
CENTRAL_PROMETHEUS: Final = MONITORING / "prometheus-central.yml"
DASHBOARD: Final = MONITORING / "dashboards" / "edge-fleet.json"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def binary(name: str, package: str) -> str:
    """A Debian binary on PATH; in CI its absence is a setup error, not a reason to skip."""
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is missing: run `make system-deps` (Debian package {package})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)

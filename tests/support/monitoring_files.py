"""Paths of the committed monitoring files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

REPO: Final = Path(__file__).resolve().parents[2]
README: Final = REPO / "README.md"
MONITORING: Final = REPO / "deployment" / "monitoring"
RULES: Final = MONITORING / "rules" / "edge-agent.rules.yml"
RULE_TESTS: Final = MONITORING / "rules" / "edge-agent.rules.test.yml"
ALERTMANAGER: Final = MONITORING / "alertmanager.yml"
AGENT_PROMETHEUS: Final = MONITORING / "prometheus-agent.yml"
CENTRAL_PROMETHEUS: Final = MONITORING / "prometheus-central.yml"
DASHBOARD: Final = MONITORING / "dashboards" / "edge-fleet.json"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))

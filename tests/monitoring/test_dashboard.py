"""The committed dashboard is what the generator makes, and every panel carries a query."""

from __future__ import annotations

import json
from pathlib import Path

from deployment.monitoring import dashboard
from tests.support.monitoring_files import DASHBOARD


def test_the_committed_dashboard_is_the_generated_one() -> None:
    assert dashboard.OUTPUT == DASHBOARD
    assert DASHBOARD.read_text(encoding="utf-8") == dashboard.render(), (
        "stale: run python -m deployment.monitoring.dashboard"
    )


def test_every_panel_has_a_prometheus_query_on_the_datasource_variable() -> None:
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    specs = [spec for _, specs in dashboard.ROWS for spec in specs]
    assert len(panels) == len(specs)
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "edge-fleet.json"
    stale.write_text("{}\n")
    assert dashboard.main(["--check", "--output", str(stale)]) == 1
    assert dashboard.main(["--output", str(stale)]) == 0
    assert dashboard.main(["--check", "--output", str(stale)]) == 0

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


def test_every_panel_says_what_it_shows_and_ids_are_unique() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in (p for p in panels if p["type"] != "row"):
        assert len(panel.get("description", "").split()) >= 6, panel["title"]


def test_drift_panels_draw_their_threshold() -> None:
    drift = [
        p
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if p["type"] == "timeseries" and "drift" in p["title"].lower()
    ]
    assert len(drift) == 5
    for panel in drift:
        queries = " ".join(t["expr"] for t in panel["targets"])
        threshold = panel["fieldConfig"]["defaults"].get("thresholds")
        # Either a line at a fixed level, or the device's own threshold plotted as a series.
        drawn = threshold is not None and threshold["steps"][-1]["value"] == 1
        assert drawn or "agent_drift_threshold" in queries, panel["title"]
        if drawn:
            style = panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"]
            assert style != "off", panel["title"]

"""The alert rules and Alertmanager routing, checked by the tools that ship with them."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.monitoring_files import (
    ALERTMANAGER,
    DASHBOARD,
    README,
    RULE_TESTS,
    RULES,
    load_yaml,
)
from tests.support.prometheus import debian_binary


def _alerts() -> list[dict[str, Any]]:
    groups = load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.e2e  # runs a Debian binary
def test_promtool_check_rules_accepts_the_rules() -> None:
    result = _run(debian_binary("promtool", "prometheus"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e  # runs a Debian binary
def test_promtool_unit_tests_pass() -> None:
    result = _run(debian_binary("promtool", "prometheus"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_has_severity_summary_and_a_description_of_what_to_do(
    rule: dict[str, Any],
) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["summary"].strip()
    assert len(rule["annotations"]["description"].split()) >= 15, "say what to do"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_links_its_runbook_section_and_its_dashboard_panel(
    rule: dict[str, Any],
) -> None:
    readme = README.read_text(encoding="utf-8")
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)}
    runbook = urlsplit(rule["annotations"]["runbook_url"])
    assert runbook.path == "README.md"
    assert runbook.fragment == rule["alert"].lower()
    assert runbook.fragment in anchors, f"no README section for {rule['alert']}"
    section = readme.split(f"### {rule['alert']}\n", 1)[1].split("\n#", 1)[0]
    assert len(section.split()) >= 30, "a runbook says what to check and what to do"

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    link = urlsplit(rule["annotations"]["dashboard_url"])
    assert link.path == f"/d/{dashboard['uid']}/edge-mlops-fleet"
    (panel_id,) = parse_qs(link.query)["viewPanel"]
    (panel,) = (p for p in dashboard["panels"] if p["id"] == int(panel_id))
    assert panel["type"] != "row"
    assert f"*{panel['title']}*" in " ".join(section.split()), "the runbook names its panel"


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    fired = {
        case["alertname"]
        for test in load_yaml(RULE_TESTS)["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _alerts()} == fired


@pytest.mark.e2e  # runs a Debian binary
def test_amtool_accepts_the_alertmanager_config() -> None:
    result = _run(
        debian_binary("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER)
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e  # runs amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"severity": "critical", "ring": "production"}, "oncall"),
        ({"severity": "warning", "ring": "production"}, "fleet"),
        ({"severity": "critical", "ring": "canary"}, "release"),
        ({"severity": "warning", "ring": "canary"}, "release"),
        ({"severity": "critical", "ring": "pilot"}, "fleet"),
        ({"severity": "warning", "ring": "pilot"}, "fleet"),
    ],
)
def test_alerts_are_routed_by_severity_and_ring(labels: dict[str, str], receiver: str) -> None:
    result = _run(
        debian_binary("amtool", "prometheus-alertmanager"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER}",
        *(f"{name}={value}" for name, value in labels.items()),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == receiver


def test_alerts_are_grouped_per_alert_ring_and_model_not_per_device() -> None:
    route = load_yaml(ALERTMANAGER)["route"]
    assert route["group_by"] == ["alertname", "ring", "model"]
    assert all("group_by" not in child for child in route["routes"]), "children inherit it"

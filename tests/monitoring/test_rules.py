"""The alert rules and Alertmanager routing, checked by the tools that ship with them."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.support.monitoring_files import ALERTMANAGER, RULE_TESTS, RULES, load_yaml
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

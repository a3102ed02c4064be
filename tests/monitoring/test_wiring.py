"""The deployment template, the on-device config and the central config agree with each other."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.support.monitoring_files import (
    AGENT_PROMETHEUS,
    CENTRAL_PROMETHEUS,
    MONITORING,
    RULES,
    load_yaml,
)
from tests.support.prometheus import debian_binary

TEMPLATE = MONITORING.parent / "deployment.template.json"


def _modules() -> dict[str, Any]:
    document = json.loads(TEMPLATE.read_text())
    modules: dict[str, Any] = document["modulesContent"]["$edgeAgent"]["properties.desired"][
        "modules"
    ]
    return modules


def _agent_metrics_endpoint() -> str:
    ports = _modules()["mlagent"]["settings"]["createOptions"]["ExposedPorts"]
    (port,) = [p.split("/")[0] for p in ports if p.startswith("9600")]
    return f"mlagent:{port}"


def test_the_device_prometheus_scrapes_the_agent_module_and_names_it() -> None:
    (scrape,) = load_yaml(AGENT_PROMETHEUS)["scrape_configs"]
    (static,) = scrape["static_configs"]
    assert static["targets"] == [_agent_metrics_endpoint()]
    assert static["labels"] == {"module_id": "mlagent"}
    assert scrape["job_name"] == "edge-agent"
    assert 'job="edge-agent"' in RULES.read_text()


def test_device_ids_come_from_the_variables_iot_edge_sets_in_every_module() -> None:
    labels = load_yaml(AGENT_PROMETHEUS)["global"]["external_labels"]
    assert labels == {
        "hub": "${IOTEDGE_IOTHUBHOSTNAME}",
        "device_id": "${IOTEDGE_DEVICEID}",
        "ring": "${EDGE_RING}",
    }
    prometheus = _modules()["prometheus"]
    assert "EDGE_RING" in prometheus["env"]
    command = prometheus["settings"]["createOptions"]["Cmd"]
    assert "--enable-feature=agent,expand-external-labels" in command
    assert "--config.file=/etc/prometheus/agent.yml" in command


def test_the_metrics_collector_alternative_collects_the_agent_endpoint() -> None:
    collector = _modules()["metricscollector"]
    endpoints = collector["env"]["MetricsEndpointsCSV"]["value"].split(",")
    assert f"http://{_agent_metrics_endpoint()}/metrics" in endpoints
    # One path at a time: the template runs the Prometheus agent, the collector is opt-in.
    assert collector["status"] == "stopped"


@pytest.mark.e2e  # runs promtool
@pytest.mark.parametrize(
    ("config", "flags"), [(CENTRAL_PROMETHEUS, ()), (AGENT_PROMETHEUS, ("--agent",))]
)
def test_promtool_accepts_the_prometheus_configs(config: object, flags: tuple[str, ...]) -> None:
    result = subprocess.run(
        [debian_binary("promtool", "prometheus"), "check", "config", *flags, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"IOTEDGE_DEVICEID": "d", "IOTEDGE_IOTHUBHOSTNAME": "h", "EDGE_RING": "r"},
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""Two devices to one notification: the whole monitoring path with real servers on loopback.

Two `python -m agent serve` processes stand for two devices of the canary ring. Each has its own
agent-mode Prometheus (the committed on-device config) adding hub, ring, device_id and module_id
and remote-writing to a central Prometheus that evaluates the committed rules and notifies the
committed Alertmanager, whose webhook is this test's. A release whose golden check fails on both
devices must reach the webhook as exactly one notification naming both devices; every query of
the committed dashboard must run, and return data wherever its metrics exist.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from agent.releases.manifest import public_key_to_b64, sign_manifest
from deployment.release import build_manifest
from tests.agent.models import tiny_bytes
from tests.agent_process import AgentProcess, LogLine, running_agent
from tests.monitoring.files import DASHBOARD
from tests.monitoring.stack import (
    GROUP_WAIT_S,
    HUB,
    Service,
    Webhook,
    running_alertmanager,
    running_central,
    running_device_prometheus,
    running_webhook,
)
from tests.prometheus import Prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

KEY_ID = "monitoring-key"
RING = "canary"
DEVICES = ("device-1", "device-2")
WAIT_S = 90.0  # any one step; a quiet machine takes a few seconds
# Series one device may send. Measured: see README "Fleet monitoring"; a new label value or
# metric family that multiplies series per device fails here first.
SERIES_BUDGET = 200
# Metrics of other issues (drift, quality, memory headroom, per-model latency) and of the IoT
# Edge module (hub link, outbox), which this test does not run: their panels must be valid
# PromQL, and return data once the metric exists.
NOT_EXPORTED_HERE = {
    "agent_drift_state",
    "agent_drift_score",
    "agent_model_accuracy",
    "agent_memory_headroom_bytes",
    "agent_model_request_duration_seconds_bucket",
    "agent_hub_connected",
    "agent_outbox_queued",
    "agent_outbox_spooled",
    "agent_outbox_dropped_total",
}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


@dataclass(frozen=True)
class Release:
    model: bytes
    manifest: dict[str, Any]

    def drop(self, folder: Path) -> None:
        """The artifact first, the manifest last, as the release folder asks."""
        (folder / f"{self.manifest['sha256']}.onnx").write_bytes(self.model)
        (folder / f"m-v{self.manifest['version']}.manifest.json").write_text(
            json.dumps(self.manifest)
        )


@dataclass(frozen=True)
class Device:
    device_id: str
    agent: AgentProcess
    watch: Path
    prometheus: Service


@dataclass(frozen=True)
class Fleet:
    devices: tuple[Device, ...]
    central: Prometheus
    alertmanager: Service
    webhook: Webhook
    bad_release: Release


def _releases(key: Ed25519PrivateKey) -> tuple[Release, Release]:
    good = tiny_bytes(0)
    v1 = build_manifest(
        good, name="m", version=1, url="https://models.example/m/1.onnx", key=key, key_id=KEY_ID
    )
    # v2 is a real model whose signed golden sample it cannot reproduce (outputs shifted by 1).
    bad = tiny_bytes(1)
    unsigned = build_manifest(
        bad, name="m", version=2, url="https://models.example/m/2.onnx", key=key, key_id=KEY_ID
    )
    del unsigned["signature"]
    for output in unsigned["golden"]["outputs"]:
        output["data"] = [value + 1.0 for value in output["data"]]
    return Release(good, v1), Release(bad, sign_manifest(unsigned, key, KEY_ID))


def _status(state: str, version: int) -> Any:
    def matches(line: LogLine) -> bool:
        return (
            line.get("event") == "model_status"
            and line.get("state") == state
            and line.get("version") == version
        )

    return matches


def _infer(agent: AgentProcess, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{agent.http_url}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _traffic(agent: AgentProcess) -> None:
    good = {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
    bad = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0.5] * 3}]}
    assert [_infer(agent, good) for _ in range(20)] == [200] * 20
    assert [_infer(agent, bad) for _ in range(3)] == [400] * 3


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    key = Ed25519PrivateKey.generate()
    v1, v2 = _releases(key)
    env = {
        "EDGEML_TRUSTED_KEYS": f"{KEY_ID}={public_key_to_b64(key.public_key())}",
        "EDGEML_WATCH_DEBOUNCE_S": "0.05",
    }
    root = tmp_path_factory.mktemp("fleet")
    with ExitStack() as stack:
        webhook = stack.enter_context(running_webhook())
        alertmanager = stack.enter_context(running_alertmanager(root / "alertmanager", webhook.url))
        central = stack.enter_context(
            running_central(root / "central", alertmanager.url.removeprefix("http://"))
        )
        devices = []
        for device_id in DEVICES:
            state, watch = root / device_id / "state", root / device_id / "watch"
            watch.mkdir(parents=True)
            args = ("--state-dir", str(state), "--watch-dir", str(watch))
            agent = stack.enter_context(running_agent(None, *args, env=env))
            v1.drop(watch)
            agent.wait_for(_status("active", 1), WAIT_S, what="v1 active")
            _traffic(agent)
            prometheus = stack.enter_context(
                running_device_prometheus(
                    root / device_id / "prometheus",
                    device_id=device_id,
                    ring=RING,
                    target=f"127.0.0.1:{agent.ports['metrics']}",
                    remote_write_url=f"{central.url}/api/v1/write",
                )
            )
            devices.append(Device(device_id, agent, watch, prometheus))
        for device_id in DEVICES:
            query = f'agent_model_info{{device_id="{device_id}", version="1"}}'
            central.wait_for(functools.partial(central.value, query), query, WAIT_S)
        yield Fleet(tuple(devices), central, alertmanager, webhook, v2)


@pytest.fixture(scope="module")
def notification(fleet: Fleet) -> dict[str, Any]:
    """Release v2 to both devices; the one notification the webhook receives for it."""
    for device in fleet.devices:
        fleet.bad_release.drop(device.watch)
    for device in fleet.devices:
        failed = device.agent.wait_for(_status("failed", 2), WAIT_S, what="v2 failed")
        assert failed["reason"] == "golden_mismatch", failed
    deadline = time.monotonic() + WAIT_S
    while not fleet.webhook.notifications():
        if time.monotonic() > deadline:
            alerts = fleet.central.api("alerts")
            pytest.fail(f"no notification after {WAIT_S} s; central alerts: {alerts}")
        time.sleep(0.5)
    # A second notification for the same group would come group_interval (5 min) later; one
    # for another group (any other alert firing) would come within group_wait.
    time.sleep(GROUP_WAIT_S + 1)
    received = fleet.webhook.notifications()
    assert len(received) == 1, json.dumps(received, indent=1)[:4000]
    path, body = received[0]
    assert path == "/release"
    return body


def test_device_labels_come_from_the_device_prometheus_not_the_agent(fleet: Fleet) -> None:
    series = fleet.central.query('agent_model_info{name="m"}')
    labels = sorted(
        (
            s["metric"]["device_id"],
            s["metric"]["hub"],
            s["metric"]["ring"],
            s["metric"]["module_id"],
        )
        for s in series
    )
    assert labels == [(device, HUB, RING, "mlagent") for device in DEVICES]
    for device in fleet.devices:
        exposition = urllib.request.urlopen(device.agent.metrics_url, timeout=5).read().decode()
        assert "device_id" not in exposition
        assert device.device_id not in exposition


def test_a_release_failing_on_two_devices_is_one_notification_naming_both(
    notification: dict[str, Any],
) -> None:
    assert notification["receiver"] == "release"
    assert notification["status"] == "firing"
    assert notification["groupLabels"] == {"alertname": "AgentModelReleaseFailed", "ring": RING}
    alerts = notification["alerts"]
    assert sorted(a["labels"]["device_id"] for a in alerts) == list(DEVICES)
    for alert in alerts:
        assert alert["labels"]["reason"] == "golden_mismatch"
        assert alert["labels"]["hub"] == HUB
        assert alert["labels"]["module_id"] == "mlagent"
        assert alert["labels"]["severity"] == "warning"
        assert "golden_mismatch" in alert["annotations"]["summary"]


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


def _substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "20s")  # ten scrapes at the test's 2 s interval
        .replace("$ring", RING)
        .replace("$device", DEVICES[0])
        .replace("$model", "m")
    )


def test_every_dashboard_query_runs_and_returns_data_where_its_metrics_exist(
    fleet: Fleet, notification: dict[str, Any]
) -> None:
    exported = set(fleet.central.api("label/__name__/values"))
    checked_with_data = 0
    for title, expr in _dashboard_queries():
        query = _substitute(expr)
        assert "$" not in query, (title, query)
        result = fleet.central.api("query", query=query)["result"]  # fails on invalid PromQL
        metrics = set(SELECTOR.findall(query))
        assert metrics, (title, query)
        if metrics <= exported:
            assert result, f"{title!r} returns nothing though {sorted(metrics)} exist: {query}"
            checked_with_data += 1
        else:
            assert metrics - exported <= NOT_EXPORTED_HERE, (title, sorted(metrics - exported))
    without_pending = [
        expr
        for _, expr in _dashboard_queries()
        if not set(SELECTOR.findall(expr)) & NOT_EXPORTED_HERE
    ]
    assert checked_with_data >= len(without_pending) > 20


def _device_series(central: Prometheus) -> dict[str, int]:
    counts = central.query(
        'count by (device_id) ({device_id=~".+", __name__!="ALERTS",'
        ' __name__!~"ALERTS_FOR_STATE|device:.*"})'
    )
    return {c["metric"]["device_id"]: int(c["value"][1]) for c in counts}


def test_series_per_device_are_bounded_and_equal_across_devices(
    fleet: Fleet, notification: dict[str, Any]
) -> None:
    counts = _device_series(fleet.central)
    assert set(counts) == set(DEVICES)
    assert len(set(counts.values())) == 1, counts
    assert counts[DEVICES[0]] <= SERIES_BUDGET, counts
    print(f"\nseries per device: {counts}")


def _samples(service: Service) -> dict[str, float]:
    """The agent-mode Prometheus's own counters, summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(service.get("/metrics").decode()):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_remote_write_bytes_per_device_per_hour_at_the_default_interval(
    fleet: Fleet, notification: dict[str, Any]
) -> None:
    device = fleet.devices[0]
    own = _samples(device.prometheus)
    data_bytes = own["prometheus_remote_storage_bytes_total"]
    samples = own["prometheus_remote_storage_samples_total"]
    requests = own["prometheus_remote_storage_sent_batch_duration_seconds_count"]
    assert samples > 0, own
    assert requests > 0, own
    assert own.get("prometheus_remote_storage_metadata_bytes_total", 0.0) == 0.0
    series = _device_series(fleet.central)[device.device_id]
    # Every request carries one scrape (the deadline is under the scrape interval).
    assert samples / requests == pytest.approx(series, rel=0.1), (samples, requests, series)
    per_scrape = data_bytes / requests
    per_hour_at_60s = per_scrape * 60
    request = urllib.request.Request(device.agent.metrics_url)
    body = urllib.request.urlopen(request, timeout=5).read()
    print(
        "\n"
        + json.dumps(
            {
                "series_per_device": series,
                "scrape_bytes": len(body),
                "scrape_bytes_gzip": len(gzip.compress(body)),
                "remote_write_requests": requests,
                "remote_write_bytes_per_sample": round(data_bytes / samples, 2),
                "remote_write_bytes_per_scrape": round(per_scrape),
                "remote_write_bytes_per_hour_at_60s": round(per_hour_at_60s),
                "gb_per_month_10000_devices": round(per_hour_at_60s * 24 * 30 * 10_000 / 1e9, 1),
            }
        )
    )
    assert per_hour_at_60s < 1_000_000

"""Two devices to one notification: the whole monitoring path with real servers on loopback.

Two devices of the canary ring: device-1 runs `python -m agent serve` on a release folder,
device-2 the IoT Edge module (`python -m module`) connected to the hub simulator and released
through its twin with the service SDK. Each has its own agent-mode Prometheus (the committed
on-device config) adding hub, ring, device_id and module_id and remote-writing to a central
Prometheus that evaluates the committed rules and notifies the committed Alertmanager, whose
webhook is this test's. A release whose golden check fails on both devices must reach the
webhook as exactly one notification naming both; every query of the committed dashboard must
run, and return data wherever its metrics exist.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure.iot.hub import IoTHubRegistryManager
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from agent.releases.manifest import public_key_to_b64, sign_manifest
from deployment.publish.release import build_manifest
from simulator import Simulator, pick_loopback_host
from tests.simulator.conftest import collect_sdk_garbage
from tests.support import module_process, module_releases, service_sdk
from tests.support.agent_process import LogLine, model_status, running_agent
from tests.support.artifact_server import make_pki
from tests.support.models import tiny_bytes
from tests.support.monitoring_files import DASHBOARD, MONITORING
from tests.support.monitoring_stack import (
    GROUP_WAIT_S,
    HUB,
    Webhook,
    running_alertmanager,
    running_central,
    running_device_prometheus,
    running_webhook,
)
from tests.support.prometheus import Prometheus, Service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

KEY_ID = "monitoring-key"
RING = "canary"
DEVICES = ("device-1", "device-2")
MODULE_DEVICE = DEVICES[1]  # the dashboard's drill-down shows it: it has the hub and outbox
WAIT_S = 90.0  # any one step; a quiet machine takes a few seconds
# Series one device may send. Measured: see README "Fleet monitoring"; a new label value or
# metric family that multiplies series per device fails here first.
SERIES_BUDGET = 200
# Metrics of other issues (drift, quality, memory headroom under a limit, per-model latency):
# their panels must be valid PromQL now, and return data once the metric exists.
NOT_EXPORTED_HERE = {
    "agent_drift_state",
    "agent_drift_cusum",
    "agent_drift_threshold",
    "agent_model_accuracy",
    "agent_memory_headroom_bytes",
    "agent_model_request_duration_seconds_bucket",
}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def _bad_golden(manifest: dict[str, Any], key: Ed25519PrivateKey, key_id: str) -> dict[str, Any]:
    """`manifest` re-signed with golden outputs its model cannot reproduce (shifted by 1)."""
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    for output in unsigned["golden"]["outputs"]:
        output["data"] = [value + 1.0 for value in output["data"]]
    return sign_manifest(unsigned, key, key_id)


def _drop(folder: Path, model: bytes, manifest: dict[str, Any]) -> None:
    """The artifact first, the manifest last, as the release folder asks."""
    (folder / f"{manifest['sha256']}.onnx").write_bytes(model)
    (folder / f"m-v{manifest['version']}.manifest.json").write_text(json.dumps(manifest))


GOOD = {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
BAD = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0.5] * 3}]}


def _post(http_url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{http_url}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code)


def _traffic(http_url: str) -> None:
    assert [_post(http_url, GOOD) for _ in range(20)] == [200] * 20
    assert [_post(http_url, BAD) for _ in range(3)] == [400] * 3


@dataclass(frozen=True)
class Device:
    device_id: str
    metrics_url: str
    prometheus: Service
    release_bad: Callable[[], None]
    wait_for: Callable[[Callable[[LogLine], bool], str], LogLine]


@dataclass(frozen=True)
class Fleet:
    devices: tuple[Device, ...]
    central: Prometheus
    webhook: Webhook


def _device_prometheus(
    stack: ExitStack, root: Path, device_id: str, port: int, central: str
) -> Service:
    return stack.enter_context(
        running_device_prometheus(
            root / device_id / "prometheus",
            device_id=device_id,
            ring=RING,
            target=f"127.0.0.1:{port}",
            remote_write_url=f"{central}/api/v1/write",
        )
    )


def _folder_device(stack: ExitStack, root: Path, central: str) -> Device:
    """device-1: the standalone agent on a release folder."""
    key = Ed25519PrivateKey.generate()
    env = {
        "EDGEML_TRUSTED_KEYS": f"{KEY_ID}={public_key_to_b64(key.public_key())}",
        "EDGEML_WATCH_DEBOUNCE_S": "0.05",
    }
    state, watch = root / DEVICES[0] / "state", root / DEVICES[0] / "watch"
    watch.mkdir(parents=True)
    agent = stack.enter_context(
        running_agent(None, "--state-dir", str(state), "--watch-dir", str(watch), env=env)
    )

    def manifest(model: bytes, version: int) -> dict[str, Any]:
        url = f"https://models.example/m/{version}.onnx"
        return build_manifest(model, name="m", version=version, url=url, key=key, key_id=KEY_ID)

    _drop(watch, tiny_bytes(0), manifest(tiny_bytes(0), 1))
    agent.wait_for(model_status("active", 1), WAIT_S, what="v1 active")
    _traffic(agent.http_url)
    return Device(
        DEVICES[0],
        agent.metrics_url,
        _device_prometheus(stack, root, DEVICES[0], agent.ports["metrics"], central),
        lambda: _drop(watch, tiny_bytes(1), _bad_golden(manifest(tiny_bytes(1), 2), key, KEY_ID)),
        lambda matches, what: agent.wait_for(matches, WAIT_S, what=what),
    )


def _module_device(stack: ExitStack, root: Path, central: str) -> Device:
    """device-2: the IoT Edge module on the hub simulator, released through its twin."""
    sim = stack.enter_context(
        Simulator.start(
            MONITORING.parent / "deployment.template.json",
            run_dir=root / "sim",
            host=pick_loopback_host(),
        )
    )
    stack.callback(collect_sdk_garbage)
    patch = stack.enter_context(pytest.MonkeyPatch.context())
    patch.setenv("REQUESTS_CA_BUNDLE", str(sim.ca_cert_path))
    registry = IoTHubRegistryManager.from_connection_string(sim.service_connection_string)
    stack.callback(registry.amqp_svc_client.disconnect_sync)
    service = service_sdk.Service(registry, sim.device_id)
    (root / "pki").mkdir()
    pki = make_pki(root / "pki")
    artifacts = module_releases.ThreadedArtifacts(pki)
    stack.callback(artifacts.close)
    releases = module_releases.Releases(artifacts)
    env = module_process.module_environment(
        sim.edge_env(sim.device_id, module_process.MODULE),
        state_dir=root / MODULE_DEVICE / "state",
        trusted_keys=releases.trusted_keys,
        artifact_ca=pki.ca_pem,
    )
    module = module_process.ModuleProcess.start(env, root / "module.log")
    stack.callback(module.close)
    module.wait_ready()
    service.publish(releases.release("m-1.onnx", tiny_bytes(0), 1))
    module.wait_for(model_status("active", 1), WAIT_S, "v1 active")
    _traffic(f"http://127.0.0.1:{module.ports['http']}")

    def release_bad() -> None:
        url = releases.serve("m-2.onnx", tiny_bytes(1))
        manifest = releases.manifest(tiny_bytes(1), 2, url)
        service.publish(_bad_golden(manifest, releases.key, module_releases.KEY_ID))

    return Device(
        MODULE_DEVICE,
        f"http://127.0.0.1:{module.ports['metrics']}/metrics",
        _device_prometheus(stack, root, MODULE_DEVICE, module.ports["metrics"], central),
        release_bad,
        lambda matches, what: module.wait_for(matches, WAIT_S, what),
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    with ExitStack() as stack:
        webhook = stack.enter_context(running_webhook())
        alertmanager = stack.enter_context(running_alertmanager(root / "alertmanager", webhook.url))
        central = stack.enter_context(
            running_central(root / "central", alertmanager.url.removeprefix("http://"))
        )
        devices = (
            _folder_device(stack, root, central.url),
            _module_device(stack, root, central.url),
        )
        for device_id in DEVICES:
            query = f'agent_model_info{{device_id="{device_id}", version="1"}}'
            central.wait_for(functools.partial(central.value, query), query, WAIT_S)
        yield Fleet(devices, central, webhook)


@pytest.fixture(scope="module")
def notification(fleet: Fleet) -> dict[str, Any]:
    """Release v2 to both devices; the one notification the webhook receives for it."""
    # The twin path (download, verify) is the slower: start it first, and give the folder its
    # release when the module loads, so both alerts reach Alertmanager within its group_wait.
    folder, module = fleet.devices
    module.release_bad()
    module.wait_for(model_status("loading", 2), "v2 loading")
    folder.release_bad()
    for device in fleet.devices:
        failed = device.wait_for(model_status("failed", 2), "v2 failed")
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
    series = fleet.central.query('agent_model_info{model="m"}')
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
        exposition = urllib.request.urlopen(device.metrics_url, timeout=5).read().decode()
        assert "device_id" not in exposition
        assert device.device_id not in exposition


def test_a_release_failing_on_two_devices_is_one_notification_naming_both(
    notification: dict[str, Any],
) -> None:
    assert notification["receiver"] == "release"
    assert notification["status"] == "firing"
    assert notification["groupLabels"] == {
        "alertname": "AgentModelReleaseFailed",
        "ring": RING,
        "model": "m",
    }
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
        .replace("$device", MODULE_DEVICE)
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


def test_series_per_device_are_bounded(fleet: Fleet, notification: dict[str, Any]) -> None:
    counts = _device_series(fleet.central)
    assert set(counts) == set(DEVICES)
    assert max(counts.values()) <= SERIES_BUDGET, counts
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
    device = fleet.devices[1]  # the module: what a production device sends
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
    body = urllib.request.urlopen(device.metrics_url, timeout=5).read()
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

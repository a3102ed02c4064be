"""The module end to end: `python -m module` as its own process against the simulator, driven
by the real azure-iot-hub service SDK and a real azure-iot-device sensor module, fetching
signed releases from a real HTTPS artifact server."""

from __future__ import annotations

import base64
import hashlib
import itertools
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.releases.manifest import sign_manifest
from simulator import Simulator
from simulator.core import UpstreamMessage
from tests.module.conftest import StartModule
from tests.support.models import MID_FEATURES, TINY_FEATURES, mid_bytes, tiny_bytes
from tests.support.module_harness import (
    KEY_ID,
    MODULE,
    SENSOR,
    ModuleProcess,
    Releases,
    Service,
    infer_request,
    model_entry,
    reference,
    send_infer,
    sensor_client,
)
from tests.support.polling import poll

pytestmark = pytest.mark.e2e

V1, V2 = tiny_bytes(0), tiny_bytes(1)
MID = mid_bytes(0)


def _predictions(sim: Simulator) -> list[UpstreamMessage]:
    return [m for m in sim.upstream.items() if m.output == "predictions"]


def _rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, TINY_FEATURES)).astype(np.float32)


def _mid_rows() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, MID_FEATURES)).astype(np.float32)


def _publish_v1(service: Service, releases: Releases) -> dict[str, Any]:
    manifest = releases.release("v1.onnx", V1, 1)
    service.publish(manifest)
    service.wait_model(1)
    return manifest


def test_a_release_published_through_the_service_sdk_becomes_active(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    module = start_module()
    manifest = releases.release("v1.onnx", V1, 1)
    version = service.publish(manifest)
    service.wait_model(1)
    reported = service.reported()
    assert model_entry(reported)["sha256"] == manifest["sha256"]
    assert model_entry(reported)["active_version"] == 1
    # The hub keeps no nulls: `message: null` removes the key (no stale rejection message).
    assert reported["desired"] == {"version": version, "state": "applied"}
    assert releases.artifacts.requests_for("v1.onnx")  # fetched over HTTPS, not from elsewhere
    # Neither the SAS query of the artifact URL nor the module's key is logged.
    connection = sim.module_connection_string(sim.device_id, MODULE)
    module_key = connection.split("SharedAccessKey=", 1)[1]
    assert "sig=SECRET" in manifest["url"]
    log = "".join(module.raw)
    assert "download_completed" in log
    assert "SECRET" not in log
    assert module_key not in log


def test_sensor_route_messages_are_answered_upstream_with_their_correlation_ids(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    start_module()
    _publish_v1(service, releases)
    sent = {f"corr-{i}": _rows(i) for i in range(20)}
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        for correlation_id, rows in sent.items():
            send_infer(c, correlation_id, rows)
        answers = sim.upstream.wait_for_count(
            lambda m: m.output == "predictions", len(sent), timeout=30
        )
    by_id = {m.message.system["correlationId"]: m for m in answers}
    assert sorted(by_id) == sorted(sent)
    for correlation_id, answer in by_id.items():
        assert answer.module_id == MODULE
        assert answer.message.properties["schema"] == "oip-v2-response/1"
        body = answer.json()
        assert body["id"] == correlation_id
        assert body["model_name"] == "m"
        assert body["model_version"] == "1"
        [output] = body["outputs"]
        produced = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(produced, reference(V1, sent[correlation_id]), atol=1e-5)


def test_a_bad_route_request_is_answered_with_an_error_under_its_correlation_id(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """A bad request over a route: the sender learns what was wrong; the next request is served."""
    start_module()
    _publish_v1(service, releases)
    wrong_width = np.zeros((1, TINY_FEATURES - 1), dtype=np.float32)
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        send_infer(c, "bad-shape", wrong_width)
        send_infer(c, "good", _rows(3))
        answers = sim.upstream.wait_for_count(lambda m: m.output == "predictions", 2, timeout=30)
    by_id = {m.message.system["correlationId"]: m for m in answers}
    bad = by_id["bad-shape"]
    assert bad.message.properties["schema"] == "oip-v2-error/1"
    assert "input" in bad.json()["error"]
    good = by_id["good"]
    assert good.message.properties["schema"] == "oip-v2-response/1"
    assert good.json()["model_version"] == "1"


def test_a_hot_swap_under_route_traffic_loses_and_fails_no_message(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    start_module()
    _publish_v1(service, releases)
    sent: dict[str, np.ndarray] = {}
    stop = threading.Event()
    connection = sim.module_connection_string(sim.device_id, SENSOR)

    errors: list[Exception] = []

    def send_until_stopped() -> None:
        try:
            with sensor_client(connection, sim.ca_cert_path) as client:
                index = 0
                while not stop.is_set() and index < 2000:
                    correlation_id = f"swap-{index}"
                    sent[correlation_id] = _rows(index)
                    send_infer(client, correlation_id, sent[correlation_id])
                    index += 1
                    time.sleep(0.005)
        except Exception as error:  # reported by the test, not lost with the thread
            errors.append(error)

    sender = threading.Thread(target=send_until_stopped, name="sensor")
    sender.start()
    try:
        poll(lambda: len(_predictions(sim)) >= 30, 30, "traffic answered before the swap")
        service.publish(releases.release("v2.onnx", V2, 2))
        service.wait_model(2)
        swapped_at = len(sent)
        poll(lambda: len(sent) >= swapped_at + 30, 30, "traffic sent after the swap")
    finally:
        stop.set()
        sender.join(30)
    assert not errors, errors
    answers = sim.upstream.wait_for_count(
        lambda m: m.output == "predictions", len(sent), timeout=60
    )
    time.sleep(0.5)  # a duplicate would come right behind the last answer
    answers = _predictions(sim)
    ids = [m.message.system["correlationId"] for m in answers]
    assert sorted(ids) == sorted(sent), "every request answered exactly once"
    versions: list[str] = []
    for answer in answers:
        assert answer.message.properties["schema"] == "oip-v2-response/1", answer.body[:200]
        body = answer.json()
        versions.append(body["model_version"])
        model = {"1": V1, "2": V2}[body["model_version"]]
        [output] = body["outputs"]
        produced = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(produced, reference(model, sent[body["id"]]), atol=1e-5)
    assert versions.count("1") >= 30
    assert versions.count("2") >= 30
    assert versions[-1] == "2"


def test_sigterm_during_a_swap_exits_0_reports_and_the_restart_finishes_the_release(
    sim: Simulator,
    service: Service,
    releases: Releases,
    start_module: StartModule,
    tmp_path: Path,
) -> None:
    module = start_module()
    _publish_v1(service, releases)
    # A large release whose artifact trickles out: the swap is still downloading at SIGTERM.
    url = releases.serve("v2-mid.onnx", MID, stall_interval_s=0.2)
    service.publish(releases.manifest(MID, 2, url, golden=False, contract_change=True))
    module.wait_for(
        lambda line: line.get("event") == "download_started" and "v2-mid" in str(line.get("url")),
        30,
        "the v2 download started",
    )
    poll(lambda: releases.artifacts.requests_for("v2-mid.onnx"), 10, "the artifact requested")
    started = time.monotonic()
    code = module.terminate(timeout=15, fail=False)
    exit_s = time.monotonic() - started
    assert not _download_outlived_its_cancel(module), "a cancelled download went on"
    assert code == 0
    assert exit_s < 10, "inside Docker's 10 s between SIGTERM and SIGKILL"
    assert not module.events("service_stop_failed")
    assert not module.events("service_stop_timed_out")
    assert module.events("download_abandoned")
    reported = service.reported()
    assert "stopped" in reported["agent"], "the final reported patch went out"
    assert model_entry(reported)["version"] == 2
    assert model_entry(reported)["state"] == "downloading"  # truthful: it was cut off there
    assert model_entry(reported)["active_version"] == 1
    assert not list((tmp_path / "state").rglob("*.part")), "no half-finished download kept"

    releases.artifacts.server.artifacts["v2-mid.onnx"].stall_interval_s = None
    restarted = start_module()
    service.wait_model(2, timeout=60)
    reported = service.reported()
    assert model_entry(reported)["sha256"] == hashlib.sha256(MID).hexdigest()
    assert "stopped" not in reported["agent"]
    status, body = restarted.infer_http("m", infer_request("after", _mid_rows()))
    assert status == 200, body
    assert body["model_version"] == "2"


def _download_outlived_its_cancel(module: ModuleProcess) -> bool:
    """A download still logging more than 5 s after SIGTERM: its cancellation was lost."""
    [stop] = module.events("stop_requested")
    return any(
        str(line.get("event")).startswith("download_") and _at(line) - _at(stop) > 5
        for line in list(module.lines)
    )


def test_three_patches_while_offline_only_the_newest_is_applied_on_reconnect(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    module = start_module()
    _publish_v1(service, releases)
    # Refused until the three patches are in, however long a loaded machine takes for them.
    sim.faults.refuse_connections(sim.device_id, MODULE, 120)
    assert sim.faults.drop_connection(sim.device_id, MODULE)
    poll(lambda: not sim.is_connected(sim.device_id, MODULE), 10, "the module offline")
    for version in (2, 3, 4):
        service.publish(releases.release(f"offline-v{version}.onnx", tiny_bytes(version), version))
    newest = service.desired_version()
    assert not sim.is_connected(sim.device_id, MODULE), "the patches landed while offline"
    sim.faults.refuse_connections(sim.device_id, MODULE, 0)  # the hub takes it back
    service.wait_model(4, timeout=60)
    service.wait_reported(
        lambda r: r.get("desired", {}).get("version") == newest, 10, "the newest $version"
    )
    assert releases.artifacts.requests_for("offline-v4.onnx")
    assert not releases.artifacts.requests_for("offline-v2.onnx")
    assert not releases.artifacts.requests_for("offline-v3.onnx")
    superseded = [line for line in module.events("model_status") if line["version"] in (2, 3)]
    assert superseded == [], "the superseded releases were never acted on"


def test_a_failed_twin_read_on_reconnect_is_retried(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """Desired state is re-read on every reconnect, even when the first read fails."""
    module = start_module({"EDGEML_MODULE_CALL_TIMEOUT_S": "2"})
    _publish_v1(service, releases)
    sim.faults.refuse_connections(sim.device_id, MODULE, 120)
    assert sim.faults.drop_connection(sim.device_id, MODULE)
    poll(lambda: not sim.is_connected(sim.device_id, MODULE), 10, "the module offline")
    service.publish(releases.release("v2.onnx", V2, 2))
    sim.faults.twin_responses(status=500, count=3)  # the reads after the reconnect fail
    sim.faults.refuse_connections(sim.device_id, MODULE, 0)
    module.wait_for(lambda line: line.get("event") == "twin_get_failed", 30, "a failed read")
    service.wait_model(2, timeout=30)


def test_a_download_outlives_a_hub_outage_and_its_state_is_reported_after_it(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """The link drops mid-download; the swap completes offline, is reported on
    reconnect, and the full twin replayed by the reconnect does not start it again."""
    module = start_module({"EDGEML_MODULE_CALL_TIMEOUT_S": "2"})
    _publish_v1(service, releases)
    # The artifact answers 503 + Retry-After first: the download is under way for ~3 s.
    url = releases.serve("v2.onnx", V2, status=503, status_times=1, retry_after="3")
    service.publish(releases.manifest(V2, 2, url))
    module.wait_for(lambda line: line.get("event") == "download_retry", 30, "the 503 retried")
    sim.faults.refuse_connections(sim.device_id, MODULE, 120)
    assert sim.faults.drop_connection(sim.device_id, MODULE)
    active = module.wait_for(
        lambda line: (
            line.get("event") == "model_status"
            and line.get("version") == 2
            and line.get("state") == "active"
        ),
        30,
        "v2 active",
    )
    assert not sim.is_connected(sim.device_id, MODULE), "the swap completed while offline"
    assert model_entry(service.reported())["state"] == "downloading"  # the hub has not heard yet
    sim.faults.refuse_connections(sim.device_id, MODULE, 0)
    service.wait_model(2)
    reconnected = [line for line in module.events("hub_connection") if line["connected"]][-1]
    assert _at(active) < _at(reconnected)
    assert len(releases.artifacts.requests_for("v2.onnx")) == 2  # the 503, then the body
    downloads = [
        line for line in module.events("download_started") if "v2.onnx" in str(line["url"])
    ]
    assert len(downloads) == 1, "the replayed desired document started nothing"


def test_a_storm_of_500_patches_keeps_one_download_in_flight_and_ends_on_the_newest(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """A patch storm: 500 desired patches in about 10 s, alternating two models."""
    module = start_module()
    _publish_v1(service, releases)
    models = {"storm-a.onnx": tiny_bytes(2), "storm-b.onnx": tiny_bytes(3)}
    urls = {name: releases.serve(name, data) for name, data in models.items()}
    names = sorted(models)
    manifests = [
        releases.manifest(models[names[i % 2]], 2 + i, urls[names[i % 2]]) for i in range(500)
    ]
    process = module.psutil
    rss_before = process.memory_info().rss
    rss_peak = rss_before
    started = time.monotonic()
    for index, manifest in enumerate(manifests):
        sim.update_desired(sim.device_id, MODULE, {"models": {"m": manifest}})
        rss_peak = max(rss_peak, process.memory_info().rss)
        # Paced to about 10 s in all, without drifting.
        time.sleep(max(0.0, started + (index + 1) * 0.02 - time.monotonic()))
    newest = int(sim.twin(sim.device_id, MODULE)["properties"]["desired"]["$version"])
    last = manifests[-1]
    service.wait_model(last["version"], timeout=60)
    service.wait_reported(
        lambda r: r.get("desired", {}).get("version") == newest, 20, "the newest $version"
    )
    reported = service.reported()
    assert model_entry(reported)["sha256"] == last["sha256"]
    assert model_entry(reported)["active_version"] == last["version"]

    time.sleep(2)  # let superseded sessions be released
    rss_after = process.memory_info().rss
    mib = 1 << 20
    print(  # the measurement, for the run's record
        f"storm RSS: before {rss_before / mib:.0f} MiB, peak {rss_peak / mib:.0f} MiB, "
        f"after {rss_after / mib:.0f} MiB; {len(releases.artifacts.server.requests)} requests"
    )
    assert rss_after - rss_before < 64 * mib, "resident memory grew with the storm"
    events = sim.events.items()
    patches = [e.data["patch"] for e in events if e.kind == "reported" and e.module_id == MODULE]
    # Health, drift and profile sections are also reported at their own cadence: count only the
    # patches that answer a desired document.
    answers = [p for p in patches if isinstance(p, dict) and "desired" in p]
    assert 0 < len(answers) < 500, "reported updates were coalesced, not sent one per patch"

    problems: list[str] = []
    # At most one download in flight, from the module's own log: a newer download may start
    # while a superseded one closes its connection, but never runs beside it for longer.
    downloads = _download_intervals(module)
    assert len(downloads) >= 2
    overlaps = [
        older_end - newer_start
        for index, (newer_start, _) in enumerate(downloads)
        for (_, older_end) in downloads[:index]
        if older_end > newer_start
    ]
    if max(overlaps, default=0.0) >= 0.5:
        problems.append(f"downloads ran side by side for {max(overlaps):.2f} s")
    # Versions never go backwards: once a version is active, no older one becomes active.
    statuses = module.events("model_status")
    active = [line["version"] for line in statuses if line["state"] == "active"]
    if active != sorted(active):
        problems.append(f"active versions went backwards: {_first_inversion(active)}")
    # As the hub saw it: reported patches arrive in order, so the model version
    # the twin shows never goes back, and the desired version neither.
    entries = [model_entry(p) for p in patches]
    shown = [entry["version"] for entry in entries if "version" in entry]
    if shown != sorted(shown):
        problems.append(f"the reported model version went backwards: {_first_inversion(shown)}")
    desired = [p["desired"]["version"] for p in patches if "version" in p.get("desired", {})]
    if desired != sorted(desired):
        problems.append(f"the reported desired version went back: {_first_inversion(desired)}")
    continued = _superseded_installs_that_went_on(module)
    if continued:
        problems.append(f"superseded installs went on: versions {continued}")
    assert not problems, problems


def _first_inversion(values: list[int]) -> str:
    index = next(i for i, (a, b) in enumerate(itertools.pairwise(values)) if b < a)
    return f"{values[index]} then {values[index + 1]}"


def _superseded_installs_that_went_on(module: ModuleProcess) -> list[int]:
    """Versions whose install logged progress after `install_superseded` had cancelled it."""
    superseded: set[int] = set()
    went_on: list[int] = []
    for line in list(module.lines):
        if line.get("event") == "install_superseded":
            superseded.add(int(line["version"]))
        elif (
            line.get("event") == "model_status"
            and line.get("version") in superseded
            and line.get("state") in {"verifying", "loading", "active"}
            and line["version"] not in went_on
        ):
            went_on.append(int(line["version"]))
    return went_on


def _download_intervals(module: ModuleProcess) -> list[tuple[float, float]]:
    """(start, end) of each download, in start order, matched by sha256 (first in, first out);
    a download still running counts as ending now."""
    ends = {"download_completed", "download_failed", "download_abandoned"}
    running: dict[str, list[int]] = {}
    intervals: list[list[float]] = []
    for line in list(module.lines):
        event = line.get("event")
        if event == "download_started":
            running.setdefault(str(line["sha256"]), []).append(len(intervals))
            intervals.append([_at(line), time.time()])
        elif event in ends and running.get(str(line["sha256"])):
            intervals[running[str(line["sha256"])].pop(0)][1] = _at(line)
    return [(start, end) for start, end in intervals]


def _at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()


def _nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "case",
    [
        ({"telemetry": {"interval_s": "5"}}, {"telemetry": {"interval_s": 60.0}}, "interval_s"),
        ({"unknown_setting": 1}, {"unknown_setting": None}, "unknown_setting"),
        ({"drift": {"note": "x" * 4100}}, {"drift": None}, "4096"),
        ({"drift": {"deep": _nested_lists(12)}}, {"drift": None}, "deeper than 10"),
        ({"model": None}, None, "model: null"),
    ],
    ids=["wrong-type", "unknown-field", "4kb-string", "deep-nesting", "null-model"],
)
def test_invalid_desired_properties_are_rejected_and_the_old_model_keeps_serving(
    sim: Simulator,
    service: Service,
    releases: Releases,
    start_module: StartModule,
    case: tuple[dict[str, Any], dict[str, Any] | None, str],
) -> None:
    """Invalid desired properties: rejected, the reason reported and alerted; a fix applies."""
    bad, fix, fragment = case
    module = start_module()
    manifest = _publish_v1(service, releases)
    version = service.update_desired(bad)
    reported = service.wait_reported(
        lambda r: r.get("desired", {}).get("version") == version, 20, f"desired {version}"
    )
    assert reported["desired"]["state"] == "rejected", reported["desired"]
    assert fragment in reported["desired"]["message"]
    alert = sim.upstream.wait_for(
        lambda m: m.output == "alerts" and m.json()["kind"] == "desired_rejected", timeout=20
    )
    message = reported["desired"]["message"]
    assert alert.json()["details"] == {"version": version, "message": message}
    assert alert.message.properties["schema"] == "agent-alert/1"
    assert model_entry(reported)["state"] == "active"
    assert model_entry(reported)["version"] == 1
    status, body = module.infer_http("m", infer_request("still-v1", _rows(0)))
    assert status == 200, body
    assert body["model_version"] == "1"

    fixed = service.update_desired(fix if fix is not None else {"models": {"m": manifest}})
    service.wait_reported(
        lambda r: r.get("desired") == {"version": fixed, "state": "applied"}, 20, "the fix"
    )


def test_direct_methods_through_the_service_sdk(
    service: Service, releases: Releases, start_module: StartModule
) -> None:
    """status, rollback after two releases, profile, a bad payload (400), an unknown method."""
    module = start_module()
    _publish_v1(service, releases)
    status, body = service.invoke("status")
    assert status == 200, body
    assert body["hub_connected"] is True
    assert body["ready"] is True
    assert body["models"]["m"]["version"] == 1
    assert body["models"]["m"]["state"] == "active"
    assert body["desired_version"] == service.desired_version()

    service.publish(releases.release("v2.onnx", V2, 2))
    service.wait_model(2)
    status, body = service.invoke("rollback", {})
    assert status == 200, body
    # One entry, one release: v2 was rolled back; v1 serves (`active_version`).
    assert (body["state"], body["version"], body["reason"]) == ("rolled_back", 2, "requested")
    assert body["active_version"] == 1
    service.wait_model(2, "rolled_back")
    code, answer = module.infer_http("m", infer_request("after-rollback", _rows(1)))
    assert code == 200, answer
    assert answer["model_version"] == "1"

    status, body = _invoke_while(
        service,
        "profile",
        {"seconds": 1},
        lambda i: module.infer_http("m", infer_request(f"p{i}", _rows(1))),
    )
    assert status == 200, body
    assert body["models"]["m"]["requests"] >= 1  # per-model figures of the window
    assert body["models"]["m"]["latency_p99_ms"] > 0
    assert body["models"]["m"]["load_rss_delta_mb"] is not None
    assert body["resources"]["rss_mb"] > 0
    assert body["resources"]["cgroup"] in {"v1", "v2", "none"}

    status, body = service.invoke("profile", {"seconds": "one"})
    assert status == 400
    assert "seconds" in body["error"]
    status, body = service.invoke("status", {"verbose": True})
    assert status == 400
    assert "verbose" in body["error"]
    status, body = service.invoke("rollback", [1])
    assert status == 400
    assert body["error"].startswith("bad rollback payload: payload: Input should be")

    status, body = service.invoke("reboot", {})
    assert status == 404
    assert "reboot" in body["error"]


def test_telemetry_spooled_while_the_hub_is_down_is_delivered_after_it_returns(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """An outage (shortened): sends time out while the hub is away; nothing is lost or doubled,
    and the process does not grow threads."""
    module = start_module({"EDGEML_MODULE_CALL_TIMEOUT_S": "2"})
    _publish_v1(service, releases)
    service.update_desired({"telemetry": {"interval_s": 1.0}})
    sim.upstream.wait_for_count(telemetry, 3, timeout=20)
    threads_before = module.psutil.num_threads()
    last = [m for m in sim.upstream.items() if telemetry(m)][-1].json()
    assert last["resources"]["threads"] >= 1
    assert last["models"]["m"]["state"] == "active"
    assert "latency_p99_ms" in last["models"]["m"]["profile"]
    profile = service.wait_reported(lambda r: "profile" in r, 20, "a profile")["profile"]
    assert profile["rss_mb"] > 0
    assert set(profile["models"]) == {"m"}

    down_at, back_at = _outage(sim, 10)
    # Everything put while offline arrives, then telemetry keeps flowing.
    poll(
        lambda: [m for m in sim.upstream.items() if telemetry(m) and _sent_at(m) > back_at + 3],
        30,
        "telemetry after the outage",
    )
    messages = [m for m in sim.upstream.items() if telemetry(m)]
    ids = [m.message.system["messageId"] for m in messages]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    stamps = sorted(_sent_at(m) for m in messages)
    offline = [t for t in stamps if down_at < t < back_at]
    assert len(offline) >= 8, f"only {len(offline)} messages from the outage arrived"
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert max(gaps) < 2.5, f"a telemetry message is missing: a {max(gaps):.1f} s gap"
    for reason in ("too_large", "spool_full", "corrupt", "not_json"):
        assert module.metric("agent_outbox_dropped_total", {"reason": reason}) == 0
    assert (module.metric("agent_outbox_send_failures_total") or 0) > 0, "sends did fail"
    assert module.events("hub_connection")[-1]["connected"] is True

    # Thread pools fill lazily up to their bounds, so the first outage may add a thread; a
    # second one must not add any more.
    threads_after_first = module.psutil.num_threads()
    _outage(sim, 4)
    poll(
        lambda: [m for m in sim.upstream.items() if telemetry(m) and _sent_at(m) > time.time() - 1],
        30,
        "telemetry after the second outage",
    )
    threads_after_second = module.psutil.num_threads()
    print(f"threads: {threads_before} before, {threads_after_first}, {threads_after_second} after")
    assert threads_after_second <= threads_after_first <= threads_before + 2
    # The asyncio task count is not checked: the status method does not expose it.


def _invoke_while(
    service: Service, method: str, payload: dict[str, Any], work: Callable[[int], object]
) -> tuple[int, Any]:
    """Invoke `method` while `work(i)` runs over and over (requests for a profile to see)."""
    done = threading.Event()

    def repeat() -> None:
        for i in itertools.count():
            if done.wait(0.05):
                return
            work(i)

    worker = threading.Thread(target=repeat)
    worker.start()
    try:
        return service.invoke(method, payload)
    finally:
        done.set()
        worker.join()


def _outage(sim: Simulator, seconds: float) -> tuple[float, float]:
    """Drop the module's link and refuse it for `seconds`; (down at, back at), wall clock."""
    sim.faults.refuse_connections(sim.device_id, MODULE, seconds)
    assert sim.faults.drop_connection(sim.device_id, MODULE)
    down_at = time.time()
    poll(lambda: not sim.is_connected(sim.device_id, MODULE), 10, "the module offline")
    poll(lambda: sim.is_connected(sim.device_id, MODULE), 60, "the module back", interval=0.25)
    back_at = time.time()
    assert back_at - down_at >= seconds - 0.5
    return down_at, back_at


def telemetry(message: UpstreamMessage) -> bool:
    return message.output == "telemetry"


def _sent_at(message: UpstreamMessage) -> float:
    return datetime.fromisoformat(message.json()["at"]).timestamp()


def _forged(manifest: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    forged = {**manifest, "name": name or manifest["name"]}
    forged["signature"] = {**manifest["signature"], "value": base64.b64encode(bytes(64)).decode()}
    return forged


def test_forged_manifests_touch_nothing_and_a_rollback_survives_a_restart_and_a_resync(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """Issue 8: a forged `m` and a forged `other` leave m's reported state, the route's default
    model and the v2 metadata alone; v2 rolled back stays rolled back across a restart (new
    process, same volume) and a full twin resync, without being installed again."""
    module = start_module()
    _publish_v1(service, releases)
    genuine = releases.release("v2.onnx", V2, 2)
    before = model_entry(service.reported())
    service.publish(_forged(genuine))
    service.publish(_forged(genuine, "other"))
    reported = service.wait_reported(
        lambda r: {"m", "other"} <= set(r.get("rejected") or {}), 20, "both forgeries rejected"
    )
    assert reported["rejected"]["m"]["reason"] == "signature_invalid"
    assert reported["rejected"]["other"]["reason"] == "signature_invalid"
    assert model_entry(reported) == before
    assert "other" not in (reported.get("models") or {})
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        send_infer(c, "default-model", _rows(5))  # no `model` property: the default model
        [answer] = sim.upstream.wait_for_count(lambda m: m.output == "predictions", 1, 30)
    assert answer.json()["model_name"] == "m", answer.json()
    metadata = module.metadata("m")
    assert metadata["parameters"]["status_state"] == "active"
    assert metadata["versions"] == ["1"]

    service.publish(genuine)  # re-published genuine: the rejection no longer stands in its way
    service.wait_model(2)
    status, body = service.invoke("rollback", {})
    assert (status, body["state"], body["version"]) == (200, "rolled_back", 2), body
    service.wait_model(2, "rolled_back")
    module.terminate()

    restarted = start_module()  # same state dir: the twin still desires v2
    # The twin still shows the previous run's report: wait for this run's answer to v2.
    reported = service.wait_reported(
        lambda r: "version 2 was rolled back" in str(model_entry(r).get("message")),
        60,
        "v2 answered rolled_back after the restart",
    )
    entry = model_entry(reported)
    assert (entry["state"], entry["reason"], entry["version"]) == ("rolled_back", "requested", 2)
    assert entry["active_version"] == 1
    connected = len(restarted.events("twin_read"))
    assert sim.faults.drop_connection(sim.device_id, MODULE)  # a full twin resync
    poll(lambda: len(restarted.events("twin_read")) > connected, 30, "the twin read again")
    status, body = restarted.infer_http("m", infer_request("after-restart", _rows(2)))
    assert (status, body["model_version"]) == (200, "1"), body
    installs = [
        line
        for line in restarted.events("model_status")
        if line.get("version") == 2 and line.get("state") in {"downloading", "loading"}
    ]
    assert installs == [], "the rolled-back release was installed again"
    assert model_entry(service.reported())["state"] == "rolled_back"


def _renamed(releases: Releases, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    unsigned = {k: v for k, v in manifest.items() if k != "signature"} | {"name": name}
    return sign_manifest(unsigned, releases.key, KEY_ID)


def test_a_model_no_longer_desired_stops_serving_also_when_removed_while_the_module_was_down(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    module = start_module()
    _publish_v1(service, releases)
    n = _renamed(releases, releases.release("n.onnx", V2, 1), "n")
    service.publish(n)
    service.wait_model(1, name="n")
    assert module.infer_http("n", infer_request("n-1", _rows(1)))[0] == 200

    service.update_desired({"models": {"n": None}})
    service.wait_reported(lambda r: "n" not in r.get("models", {}), 30, "n left the twin")
    status, body = module.infer_http("n", infer_request("n-2", _rows(2)))
    assert (status, body["error"].startswith("unknown model")) == (404, True), body
    assert module.infer_http("m", infer_request("m-1", _rows(3)))[0] == 200
    assert model_entry(service.reported())["state"] == "active"

    # While the module is down, m leaves the desired state and n comes back.
    assert module.terminate() == 0
    service.update_desired({"models": {"m": None, "n": n}})
    restarted = start_module()
    service.wait_model(1, name="n")
    service.wait_reported(lambda r: "m" not in r.get("models", {}), 30, "m left the twin")
    restarted.wait_for(lambda line: line.get("event") == "model_removed", 10, "m removed")
    assert restarted.infer_http("m", infer_request("m-2", _rows(4)))[0] == 404
    assert restarted.infer_http("n", infer_request("n-3", _rows(5)))[0] == 200

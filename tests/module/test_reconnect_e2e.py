"""Desired state across hub outages: patches while offline, failed twin reads, downloads that
outlive an outage, and a storm of patches."""

from __future__ import annotations

import itertools
import time

import pytest

from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.models import tiny_bytes
from tests.support.module_e2e import V2, log_time, publish_v1
from tests.support.module_process import MODULE, ModuleProcess
from tests.support.module_releases import Releases
from tests.support.polling import poll
from tests.support.service_sdk import Service, model_entry

pytestmark = pytest.mark.e2e


def test_three_patches_while_offline_only_the_newest_is_applied_on_reconnect(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    module = start_module()
    publish_v1(service, releases)
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
    publish_v1(service, releases)
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
    publish_v1(service, releases)
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
    assert log_time(active) < log_time(reconnected)
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
    publish_v1(service, releases)
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
            intervals.append([log_time(line), time.time()])
        elif event in ends and running.get(str(line["sha256"])):
            intervals[running[str(line["sha256"])].pop(0)][1] = log_time(line)
    return [(start, end) for start, end in intervals]

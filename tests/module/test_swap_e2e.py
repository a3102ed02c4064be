"""Hot swaps of the real module under route traffic, and a SIGTERM in the middle of one."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from simulator import Simulator
from simulator.core import UpstreamMessage
from tests.module.conftest import StartModule
from tests.support.models import MID_FEATURES, mid_bytes
from tests.support.module_e2e import V1, V2, log_time, publish_v1, tiny_rows
from tests.support.module_process import ModuleProcess
from tests.support.module_releases import Releases
from tests.support.polling import poll
from tests.support.sensor import SENSOR, infer_request, reference, send_infer, sensor_client
from tests.support.service_sdk import Service, model_entry

pytestmark = pytest.mark.e2e


MID = mid_bytes(0)


def _predictions(sim: Simulator) -> list[UpstreamMessage]:
    return [m for m in sim.upstream.items() if m.output == "predictions"]


def _mid_rows() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, MID_FEATURES)).astype(np.float32)


def test_a_hot_swap_under_route_traffic_loses_and_fails_no_message(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    start_module()
    publish_v1(service, releases)
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
                    sent[correlation_id] = tiny_rows(index)
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
    publish_v1(service, releases)
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
        str(line.get("event")).startswith("download_") and log_time(line) - log_time(stop) > 5
        for line in list(module.lines)
    )

"""Forged manifests touch nothing, a rollback survives a restart and a resync, and a model no
longer desired stops serving."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from agent.releases.manifest import sign_manifest
from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.module_e2e import V2, publish_v1, tiny_rows
from tests.support.module_process import MODULE
from tests.support.module_releases import KEY_ID, Releases
from tests.support.polling import poll
from tests.support.sensor import SENSOR, infer_request, send_infer, sensor_client
from tests.support.service_sdk import Service, model_entry

pytestmark = pytest.mark.e2e


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
    publish_v1(service, releases)
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
        send_infer(c, "default-model", tiny_rows(5))  # no `model` property: the default model
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
    status, body = restarted.infer_http("m", infer_request("after-restart", tiny_rows(2)))
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
    publish_v1(service, releases)
    n = _renamed(releases, releases.release("n.onnx", V2, 1), "n")
    service.publish(n)
    service.wait_model(1, name="n")
    assert module.infer_http("n", infer_request("n-1", tiny_rows(1)))[0] == 200

    service.update_desired({"models": {"n": None}})
    service.wait_reported(lambda r: "n" not in r.get("models", {}), 30, "n left the twin")
    status, body = module.infer_http("n", infer_request("n-2", tiny_rows(2)))
    assert (status, body["error"].startswith("unknown model")) == (404, True), body
    assert module.infer_http("m", infer_request("m-1", tiny_rows(3)))[0] == 200
    assert model_entry(service.reported())["state"] == "active"

    # While the module is down, m leaves the desired state and n comes back.
    assert module.terminate() == 0
    service.update_desired({"models": {"m": None, "n": n}})
    restarted = start_module()
    service.wait_model(1, name="n")
    service.wait_reported(lambda r: "m" not in r.get("models", {}), 30, "m left the twin")
    restarted.wait_for(lambda line: line.get("event") == "model_removed", 10, "m removed")
    assert restarted.infer_http("m", infer_request("m-2", tiny_rows(4)))[0] == 404
    assert restarted.infer_http("n", infer_request("n-3", tiny_rows(5)))[0] == 200

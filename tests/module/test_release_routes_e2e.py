"""A release through the service SDK, and the sensor routes it answers: `python -m module` as
its own process against the simulator, with a real azure-iot-device sensor module."""

from __future__ import annotations

import numpy as np
import pytest

from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.models import TINY_FEATURES
from tests.support.module_e2e import V1, publish_v1, tiny_rows
from tests.support.module_process import MODULE
from tests.support.module_releases import Releases
from tests.support.sensor import SENSOR, reference, send_infer, sensor_client
from tests.support.service_sdk import Service, model_entry

pytestmark = pytest.mark.e2e


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
    publish_v1(service, releases)
    sent = {f"corr-{i}": tiny_rows(i) for i in range(20)}
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
    publish_v1(service, releases)
    wrong_width = np.zeros((1, TINY_FEATURES - 1), dtype=np.float32)
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        send_infer(c, "bad-shape", wrong_width)
        send_infer(c, "good", tiny_rows(3))
        answers = sim.upstream.wait_for_count(lambda m: m.output == "predictions", 2, timeout=30)
    by_id = {m.message.system["correlationId"]: m for m in answers}
    bad = by_id["bad-shape"]
    assert bad.message.properties["schema"] == "oip-v2-error/1"
    assert "input" in bad.json()["error"]
    good = by_id["good"]
    assert good.message.properties["schema"] == "oip-v2-response/1"
    assert good.json()["model_version"] == "1"

"""The `infer` route answers every datatype what ONNX Runtime answers: `python -m module` against
the simulator serves one release holding an Identity per datatype and scikit-learn's
OneHotEncoder, and a sensor sends one route message with every input."""

from __future__ import annotations

import json

import pytest
from azure.iot.device import Message

from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.module_releases import Releases
from tests.support.parity import (
    assert_same,
    combined_model,
    combined_sample,
    decode_response,
    json_request,
    reference,
    square_model,
)
from tests.support.sensor import SENSOR, sensor_client
from tests.support.service_sdk import Service

pytestmark = pytest.mark.e2e


def test_the_route_answers_every_datatype_as_onnx_runtime_does(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    start_module()
    model = combined_model()
    # No golden sample: the publisher draws it from a normal distribution, no string input.
    service.publish(releases.release("parity.onnx", model, 1, golden=False))
    service.wait_model(1)
    feed = combined_sample()
    expected = reference(model, feed)
    message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        json.dumps({"id": "parity", **json_request(feed)}),
        message_id="msg-parity",
        content_encoding="utf-8",
        content_type="application/json",
    )
    message.correlation_id = "parity"
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        c.send_message_to_output(message, "samples")
        [answer] = sim.upstream.wait_for_count(lambda m: m.output == "predictions", 1, timeout=30)
    assert answer.message.properties["schema"] == "oip-v2-response/1", answer.json()
    answered = decode_response(json.dumps(answer.json()).encode(), None)
    assert set(answered) == set(expected)
    for name, array in expected.items():
        assert_same(answered[name], array, f"{name} over the route")


def test_an_overflowing_answer_is_a_counted_error_on_the_route(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    module = start_module()
    service.publish(releases.release("square.onnx", square_model(), 1, golden=False))
    service.wait_model(1)
    message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [3e38, 1]}]}
        ),
        message_id="msg-overflow",
        content_encoding="utf-8",
        content_type="application/json",
    )
    message.correlation_id = "overflow"
    with sensor_client(sim.module_connection_string(sim.device_id, SENSOR), sim.ca_cert_path) as c:
        c.send_message_to_output(message, "samples")
        [answer] = sim.upstream.wait_for_count(lambda m: m.output == "predictions", 1, timeout=30)
    assert answer.message.properties["schema"] == "oip-v2-error/1"
    assert answer.message.system["correlationId"] == "overflow"
    # Strict JSON: no NaN or Infinity literal in the answer.
    error = json.loads(answer.message.body, parse_constant=_refuse)["error"]
    assert "non_finite_output" in error
    rejected = {"reason": "non_finite_output"}
    assert module.metric("agent_inference_rejections_total", rejected) == 1
    assert module.metric("agent_route_messages_total", {"outcome": "error"}) == 1


def _refuse(literal: str) -> None:
    raise ValueError(f"{literal} is not JSON")

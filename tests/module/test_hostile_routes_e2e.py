"""Hostile route messages against `python -m module`: a 10 KB feedback message nested 1,000
levels deep (which once raised `RecursionError` out of the route task and ended the process) is
refused as too deep, and the module keeps answering the `infer` route."""

from __future__ import annotations

import json

import numpy as np
import pytest
from azure.iot.device import IoTHubModuleClient, Message

from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.module_e2e import publish_v1, tiny_rows
from tests.support.module_releases import Releases
from tests.support.polling import poll
from tests.support.sensor import SENSOR, send_infer, sensor_client
from tests.support.service_sdk import Service

pytestmark = pytest.mark.e2e

DEPTH = 1000
# The original report: ~10 KB, 1,000 levels, on the feedback input.
FEEDBACK_BOMB = b"[" * DEPTH + b'{"id":"x","label":1}' + b"]" * DEPTH + b" " * 7980


def _send(client: IoTHubModuleClient, body: bytes, *, feedback: bool) -> None:
    message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        body, content_encoding="utf-8", content_type="application/json"
    )
    message.correlation_id = "bomb"
    if feedback:  # what the deployment's routes send to the feedback input
        message.custom_properties["schema"] = "agent-feedback/1"
    client.send_message_to_output(message, "samples")


def _answered(sim: Simulator, correlation_id: str) -> bool | None:
    for m in sim.upstream.items():
        if m.output == "predictions" and m.message.system.get("correlationId") == correlation_id:
            return True
    return None


def test_a_deeply_nested_feedback_message_is_refused_and_the_infer_route_keeps_serving(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    assert 10_000 <= len(FEEDBACK_BOMB) <= 10_240
    module = start_module()
    publish_v1(service, releases)
    connection = sim.module_connection_string(sim.device_id, SENSOR)
    with sensor_client(connection, sim.ca_cert_path) as client:
        send_infer(client, "before", tiny_rows(0))
        poll(lambda: _answered(sim, "before"), 30, "the answer before the bomb")

        _send(client, FEEDBACK_BOMB, feedback=True)
        _send(client, b"[" * 100_000 + b"]" * 100_000, feedback=True)  # 200 KB, 100,000 deep
        _send(client, FEEDBACK_BOMB, feedback=False)  # the same on the infer input
        poll(
            lambda: (
                module.metric("agent_route_messages_total", {"outcome": "bad_feedback"}) == 2
                or None
            ),
            30,
            "both feedback bombs refused",
        )
        send_infer(client, "after", tiny_rows(1))
        poll(lambda: _answered(sim, "after"), 30, "the answer after the bomb")

    assert module.process.poll() is None, "the module died"
    refusals = module.events("feedback_rejected")
    assert len(refusals) == 2
    assert all("too_deep" in line["error"] for line in refusals)
    # The deep infer message is answered too: an error under its correlation id, not silence.
    [error] = [
        m.json()
        for m in sim.upstream.items()
        if m.output == "predictions" and m.message.system.get("correlationId") == "bomb"
    ]
    assert "levels deep" in error["error"]
    assert module.metric("agent_loop_failures_total", {"loop": "route"}) == 0
    assert not module.events("loop_item_failed")
    after = [m for m in sim.upstream.items() if m.message.system.get("correlationId") == "after"]
    assert json.loads(after[0].body)["model_name"] == "m"
    assert np.asarray(json.loads(after[0].body)["outputs"][0]["data"]).size > 0

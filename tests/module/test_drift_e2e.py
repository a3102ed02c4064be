"""Drift and quality end to end: a release with a baseline pack served by `python -m module`;
normal rows over the route, drifted rows over HTTP, labels over the feedback route. The state
change shows in the gauge, the reported twin and an alert; profiles go out as telemetry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from azure.iot.device import Message

from agent.releases.manifest import sign_manifest
from deployment.drift.baseline_pack import BaselineOptions, build_baseline, model_outputs
from deployment.publish.release import build_manifest
from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.artifact_server import Artifact
from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.module_releases import KEY_ID, Releases
from tests.support.polling import poll
from tests.support.sensor import SENSOR, infer_request, reference, send_infer, sensor_client
from tests.support.service_sdk import Service, model_entry

pytestmark = pytest.mark.e2e

MODEL = tiny_bytes(0)


def _release_with_baseline(releases: Releases, tmp_path: Path) -> dict[str, Any]:
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(MODEL)
    train = np.random.default_rng(0).standard_normal((3000, TINY_FEATURES)).astype(np.float32)
    input_name, outputs = model_outputs(model_file, train)
    options = BaselineOptions(window_sizes=(50,), resamples=400, simulated_windows=20_000)
    pack = json.dumps(build_baseline({input_name: train}, outputs, options)).encode()
    url = releases.serve("v1.onnx", MODEL)
    pack_url = releases.artifacts.add("v1-baseline.json", Artifact(pack))
    manifest = build_manifest(
        MODEL,
        name="m",
        version=1,
        url=url,
        key=releases.key,
        key_id=KEY_ID,
        baseline=(pack, pack_url),
    )
    return sign_manifest(
        {k: v for k, v in manifest.items() if k != "signature"}, releases.key, KEY_ID
    )


def _feedback(items: list[dict[str, Any]]) -> Message:
    message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        json.dumps(items), content_encoding="utf-8", content_type="application/json"
    )
    message.custom_properties["schema"] = "agent-feedback/1"
    return message


def _upstream(sim: Simulator, output: str) -> list[Any]:
    return [m.json() for m in sim.upstream.items() if m.output == output]


def _drift_profiles(sim: Simulator) -> list[Any]:
    return [p for p in _upstream(sim, "telemetry") if p.get("schema") == "agent-drift-profile/1"]


def test_drifted_inputs_change_the_state_everywhere_and_feedback_scores_the_model(
    sim: Simulator,
    service: Service,
    releases: Releases,
    start_module: StartModule,
    tmp_path: Path,
) -> None:
    module = start_module()
    service.update_desired({"drift": {"window_rows": 50, "max_sampled_per_second": 1e6}})
    service.publish(_release_with_baseline(releases, tmp_path))
    service.wait_model(1)
    rng = np.random.default_rng(1)
    normal = {
        f"c-{i}": rng.standard_normal((1, TINY_FEATURES)).astype(np.float32) for i in range(50)
    }

    connection = sim.module_connection_string(sim.device_id, SENSOR)
    with sensor_client(connection, sim.ca_cert_path) as client:
        for correlation_id, rows in normal.items():
            send_infer(client, correlation_id, rows)
        sim.upstream.wait_for_count(lambda m: m.output == "predictions", 50, timeout=60)
        poll(
            lambda: module.metric("agent_drift_windows_total", {"model": "m"}),
            30,
            "the first window closed",
        )
        assert module.metric("agent_drift_state", {"model": "m"}) == 0
        labels = [
            {"id": c, "label": int(reference(MODEL, rows).argmax())}
            for c, rows in list(normal.items())[:20]
        ]
        labels += [{"id": "c-0", "label": 1}, {"id": "never-predicted", "label": 1}]
        client.send_message_to_output(_feedback(labels), "feedback")

    for i in range(150):  # the sensor's gain went wrong: every reading 4 sigma high
        rows = rng.standard_normal((1, TINY_FEATURES)).astype(np.float32) + 4.0
        status, _ = module.infer_http("m", infer_request(f"h-{i}", rows))
        assert status == 200

    poll(lambda: module.metric("agent_drift_state", {"model": "m"}) == 2 or None, 30, "drift")
    score = module.metric("agent_drift_score", {"model": "m"})
    assert score is not None
    assert score > 3
    reported = service.wait_reported(
        lambda r: model_entry(r).get("drift", {}).get("state") == "drift",
        30,
        "drift reported",
    )
    drift = reported["models"]["m"]["drift"]
    assert reported["models"]["m"]["quality"]["metric"] == "accuracy"
    assert (drift["version"], drift["window_rows"]) == (1, 50)
    assert drift["top"]
    alerts = poll(
        lambda: (
            [
                a
                for a in _upstream(sim, "alerts")
                if a.get("kind") == "drift_state" and a["details"]["to"] == "drift"
            ]
            or None
        ),
        30,
        "a drift alert upstream",
    )
    details = alerts[0]["details"]
    assert (details["model"], details["version"]) == ("m", 1)
    assert details["from"] in {"ok", "warning"}  # one window far out may go straight to drift
    # Profiles and alerts are separate sends: the alert may arrive before a later window's profile.
    profiles = poll(
        lambda: _drift_profiles(sim) if len(_drift_profiles(sim)) >= 3 else None,
        30,
        "three window profiles upstream",
    )
    assert [p["seq"] for p in profiles][:3] == [1, 2, 3]
    assert all(len(json.dumps(p, separators=(",", ":"))) <= 4000 for p in profiles)

    assert module.metric("agent_feedback_total", {"outcome": "joined"}) == 20
    assert module.metric("agent_feedback_total", {"outcome": "duplicate"}) == 1
    assert module.metric("agent_feedback_total", {"outcome": "unknown"}) == 1

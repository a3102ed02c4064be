"""The README's storage-route example matches the drift profiles the agent really sends."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from azure.iot.device.iothub.pipeline import mqtt_topic_iothub

from agent.observation.drift import DriftMonitor, DriftSettings, profile_message
from module.routes import json_message
from simulator import topics
from simulator.storage import StorageRoute
from tests.support.clock import FakeClock
from tests.support.drift_packs import tabular_pack, tabular_rows

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_condition() -> str:
    found = re.findall(r'--storage-condition "([^"]+)"', README.read_text(encoding="utf-8"))
    assert found, "the README shows no --storage-condition example"
    return str(found[0])


def _profile_as_published() -> topics.Message:
    """A window profile as the module publishes it: built by the agent, wrapped by the module,
    its properties encoded on the MQTT topic by the device SDK, decoded by the simulator."""
    clock = FakeClock()
    pack = tabular_pack()
    monitor = DriftMonitor(
        pack, DriftSettings(window_rows=50, max_rows_per_request=50), clock=clock
    )
    inputs, outputs = tabular_rows(np.random.default_rng(1), 50, shift=0.0)
    monitor.observe(inputs, outputs, 50)
    clock.now += 600
    (window,) = monitor.close_windows()
    body = profile_message(
        window,
        model="anomaly",
        version=1,
        baseline_sha256="0" * 64,
        features=monitor.features,
        max_features=8,
        wall_clock=1_760_000_000.0,
    )
    message = json_message(json.dumps(body).encode(), "m-1", str(body["schema"]))
    base = mqtt_topic_iothub.get_telemetry_topic_for_publish("cam-1", "mlops")  # type: ignore[no-untyped-call]  # the SDK is unannotated
    topic = mqtt_topic_iothub.encode_message_properties_in_topic(  # type: ignore[no-untyped-call]
        message, base
    )
    parsed = topics.parse_client_topic(topic, message.data, "cam-1", "mlops")
    assert isinstance(parsed, topics.Telemetry)
    return parsed.message


def test_the_readme_storage_condition_routes_the_agents_drift_profiles() -> None:
    message = _profile_as_published()
    route = StorageRoute("drift", "UseDevelopmentStorage=true", "telemetry", _readme_condition())
    assert route.matches(message)


def test_the_old_example_would_have_routed_nothing() -> None:
    # Guards the test above: a condition on a field the profile lacks does not match.
    route = StorageRoute("drift", "UseDevelopmentStorage=true", "telemetry", "$body.kind = 'drift'")
    assert not route.matches(_profile_as_published())

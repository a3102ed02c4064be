"""Invalid desired properties sent through the service SDK are rejected; the old model serves."""

from __future__ import annotations

from typing import Any

import pytest

from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support.module_e2e import publish_v1, tiny_rows
from tests.support.module_releases import Releases
from tests.support.sensor import infer_request
from tests.support.service_sdk import Service, model_entry

pytestmark = pytest.mark.e2e


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
    manifest = publish_v1(service, releases)
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
    status, body = module.infer_http("m", infer_request("still-v1", tiny_rows(0)))
    assert status == 200, body
    assert body["model_version"] == "1"

    fixed = service.update_desired(fix if fix is not None else {"models": {"m": manifest}})
    service.wait_reported(
        lambda r: r.get("desired") == {"version": fixed, "state": "applied"}, 20, "the fix"
    )

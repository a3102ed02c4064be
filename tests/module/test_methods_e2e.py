"""The module's direct methods, invoked through the service SDK."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.module.conftest import StartModule
from tests.support.module_e2e import V2, publish_v1, tiny_rows
from tests.support.module_releases import Releases
from tests.support.sensor import infer_request
from tests.support.service_sdk import Service

pytestmark = pytest.mark.e2e


def test_direct_methods_through_the_service_sdk(
    service: Service, releases: Releases, start_module: StartModule
) -> None:
    """status, rollback after two releases, profile, a bad payload (400), an unknown method."""
    module = start_module()
    publish_v1(service, releases)
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
    code, answer = module.infer_http("m", infer_request("after-rollback", tiny_rows(1)))
    assert code == 200, answer
    assert answer["model_version"] == "1"

    status, body = _invoke_while(
        service,
        "profile",
        {"seconds": 1},
        lambda i: module.infer_http("m", infer_request(f"p{i}", tiny_rows(1))),
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

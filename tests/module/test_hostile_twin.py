"""A bomb model released through the module twin: it fails in quarantine with its reason,
reported and alerted, the module keeps serving, and a restart does not run it again."""

from __future__ import annotations

import numpy as np
import pytest

from simulator import Simulator
from tests.module.conftest import StartModule
from tests.support import bombs
from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.module_releases import Releases
from tests.support.polling import poll
from tests.support.sensor import infer_request
from tests.support.service_sdk import Service

pytestmark = pytest.mark.e2e

# The device stand-in: a candidate may allocate 512 MiB and use 5 s of CPU in its child.
LIMITS = {"EDGEML_QUARANTINE_MEMORY_BYTES": str(512 << 20), "EDGEML_QUARANTINE_CPU_S": "5"}


def test_a_bomb_through_the_twin_fails_in_quarantine_and_is_not_retried_after_a_restart(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    module = start_module(LIMITS)
    service.publish(releases.release("v1.onnx", tiny_bytes(0), 1))
    service.wait_model(1)
    bomb = releases.release(
        "bomb.onnx", bombs.constant_of_shape(), 2, golden=False, contract_change=True
    )
    service.publish(bomb)
    reported = service.wait_model(2, "failed", timeout=60)
    assert reported["reason"] == "resource_limit"
    assert reported["active_version"] == 1
    sim.upstream.wait_for(
        lambda m: m.output == "alerts" and b"resource_limit" in m.body, timeout=20
    )
    assert module.process.poll() is None, "the module died"
    rows = np.zeros((1, TINY_FEATURES), dtype=np.float32)
    assert module.infer_http("m", infer_request("after-bomb", rows))[0] == 200

    assert module.terminate() == 0
    restarted = start_module(LIMITS)
    restarted.wait_for(
        lambda line: (
            line.get("event") == "model_status"
            and line.get("version") == 2
            and line.get("reason") == "resource_limit"
        ),
        30,
        "the bomb refused again",
    )
    assert not restarted.events("quarantine_done"), "a blocked release was run again"
    # v1 is restored from the store meanwhile.
    poll(
        lambda: restarted.infer_http("m", infer_request("after-restart", rows))[0] == 200 or None,
        30,
        "v1 served after the restart",
    )
    assert not restarted.events("quarantine_done")

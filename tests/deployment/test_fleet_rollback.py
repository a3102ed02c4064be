"""`edgeml rollback NAME [--ring RING]` against the fake hub of the rollout tests: the real CLI,
the environment's ring conditions, the agent's `rollback` direct method and its payload."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from deployment.errors import PublisherError
from deployment.publish.audit import AuditLog
from deployment.publish.fleet_rollback import ring_conditions
from module.methods import RollbackPayload
from tests.deployment.conftest import Workspace
from tests.support.fake_service_hub import FakeHub

CANARY = "tags.ring = 'canary'"
BROAD = "tags.ring = 'broad'"


class AnsweringHub(FakeHub):
    """The fake hub whose devices answer as the module's method does (`refuse`: a 409)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[str] = set()
        self.payloads: list[Mapping[str, Any]] = []

    def invoke(
        self, device_id: str, module_id: str, method: str, payload: Mapping[str, Any]
    ) -> tuple[int, Any]:
        super().invoke(device_id, module_id, method, payload)
        RollbackPayload.model_validate(payload)  # what the agent's handler accepts
        self.payloads.append(payload)
        if device_id in self.refuse:
            return 409, {"error": "no last known good", "reason": "no_last_known_good"}
        return 200, {"outcome": "rolled_back", "version": 3}


@pytest.fixture
def fleet(workspace: Workspace) -> tuple[Workspace, AnsweringHub]:
    workspace.rings = {"canary": CANARY, "broad": BROAD}
    workspace.write_config()
    workspace.environ["IOTHUB_CONNECTION_STRING"] = "HostName=h;SharedAccessKey=x"
    hub = AnsweringHub()
    hub.devices = {CANARY: ["cam-1", "cam-2"], BROAD: ["cam-3"]}
    return workspace, hub


def test_a_ring_is_rolled_back_device_by_device(fleet: tuple[Workspace, AnsweringHub]) -> None:
    workspace, hub = fleet
    result = workspace.cli("rollback", "m", "--ring", "canary", hub_factory=lambda *_: hub)
    assert result.code == 0, result.err
    assert hub.methods == [("cam-1", "rollback"), ("cam-2", "rollback")]
    assert hub.payloads == [{"model": "m"}, {"model": "m"}]
    assert result.out.splitlines() == [
        "cam-1 (canary): ok 200 outcome=rolled_back version=3",
        "cam-2 (canary): ok 200 outcome=rolled_back version=3",
    ]
    last = list(AuditLog(workspace.audit).entries())[-1]
    assert (last.action, last.subject, last.outcome) == ("rollback", "m", "done")
    assert last.details["rings"] == ["canary"]
    assert set(last.details["devices"]) == {"cam-1", "cam-2"}


def test_any_failed_device_fails_the_command(fleet: tuple[Workspace, AnsweringHub]) -> None:
    workspace, hub = fleet
    hub.refuse = {"cam-2"}
    hub.offline = {"cam-3"}
    result = workspace.cli("rollback", "m", hub_factory=lambda *_: hub)
    assert result.code == 1
    assert "cam-2 (canary): FAILED 409 reason=no_last_known_good" in result.out
    assert "cam-3 (broad): FAILED unreachable" in result.out
    assert result.err.strip() == (
        "edgeml: error [restore_failed]: rollback of m failed on 2 of 3 devices: cam-2, cam-3"
    )
    last = list(AuditLog(workspace.audit).entries())[-1]
    assert (last.action, last.outcome) == ("rollback", "failed")


def test_an_empty_ring_is_an_error(fleet: tuple[Workspace, AnsweringHub]) -> None:
    workspace, hub = fleet
    hub.devices = {}
    result = workspace.cli("rollback", "m", "--ring", "broad", hub_factory=lambda *_: hub)
    assert result.code == 1
    assert "no device in ring(s) broad" in result.err


@pytest.mark.parametrize(
    ("ring", "expected"),
    [(None, {"a": "x", "b": "y"}), ("b", {"b": "y"}), ("c", None)],
)
def test_ring_conditions(ring: str | None, expected: dict[str, str] | None) -> None:
    rings = {"a": "x", "b": "y"}
    if expected is None:
        with pytest.raises(PublisherError, match=r"unknown ring c \(configured: a, b\)"):
            ring_conditions(rings, ring)
    else:
        assert ring_conditions(rings, ring) == expected

"""``edgeml rollback NAME [--ring RING]``: what an alert tells on-call to do, from the CLI.

Each device of the ring (its tag condition from the environment config, every ring's without
``--ring``) is asked through the agent's ``rollback`` direct method to go back to its last
known good version of the model. The fleet's desired state is not touched: a release that
should stay rolled back is halted with ``release`` (which re-releases the previous version).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deployment.errors import PublisherError, Reason
from deployment.publish.audit import AuditLog
from deployment.publish.hub_client import Hub

OK_STATUS = 200


@dataclass(frozen=True)
class DeviceOutcome:
    device: str
    ring: str
    ok: bool
    detail: str  # the agent's answer, or why the method did not reach it


def ring_conditions(rings: Mapping[str, str], ring: str | None) -> dict[str, str]:
    """The rings to roll back (pure): one by name, else all of them."""
    if ring is None:
        return dict(rings)
    if ring not in rings:
        configured = ", ".join(rings) or "none"
        raise PublisherError(Reason.USAGE, f"unknown ring {ring} (configured: {configured})")
    return {ring: rings[ring]}


def _detail(status: int, body: Any) -> str:
    if isinstance(body, Mapping):
        fields = ("outcome", "state", "version", "reason", "error")
        shown = [f"{k}={body[k]}" for k in fields if body.get(k) is not None]
        if shown:
            return f"{status} " + " ".join(shown)
    return str(status)


def roll_back(
    hub: Hub,
    audit: AuditLog,
    *,
    module: str,
    model: str,
    rings: Mapping[str, str],
    report: Callable[[DeviceOutcome], None],
) -> list[DeviceOutcome]:
    """Invoke ``rollback`` on every device of ``rings``; each outcome is reported as it comes
    and the whole is one audit entry. A device in several rings is asked once."""
    outcomes: list[DeviceOutcome] = []
    asked: set[str] = set()
    for ring, condition in rings.items():
        query = f"SELECT * FROM devices WHERE {condition}"  # noqa: S608 - the operator's own ring
        for twin in hub.query(query):
            device = str(twin["deviceId"])
            if device in asked:
                continue
            asked.add(device)
            try:
                status, body = hub.invoke(device, module, "rollback", {"model": model})
                outcome = DeviceOutcome(device, ring, status == OK_STATUS, _detail(status, body))
            except PublisherError as e:
                outcome = DeviceOutcome(device, ring, False, f"{e.reason}: {e.message}")
            outcomes.append(outcome)
            report(outcome)
    failed = [o.device for o in outcomes if not o.ok]
    audit.append(
        "rollback",
        model,
        "failed" if failed or not outcomes else "done",
        rings=list(rings),
        devices={o.device: o.detail for o in outcomes},
    )
    if not outcomes:
        raise PublisherError(
            Reason.NOT_FOUND, f"no device in ring(s) {', '.join(rings)}: nothing rolled back"
        )
    if failed:
        raise PublisherError(
            Reason.RESTORE_FAILED,
            f"rollback of {model} failed on {len(failed)} of {len(outcomes)} devices: "
            + ", ".join(failed),
        )
    return outcomes

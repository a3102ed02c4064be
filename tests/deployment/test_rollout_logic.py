"""The rollout's pure parts: ring priorities, layer contents, device and gate verdicts, resume."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deployment.errors import PublisherError, Reason
from deployment.publish import gate, journal, rollout
from deployment.publish.audit import AuditLog

BOUNDS = gate.GateBounds(max_error_rate=0.05, max_p99_ratio=3.0)
MANIFEST = {"name": "tiny", "version": 3, "signature": {"key_id": "k", "value": "c2ln"}}


def _report(**fields: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "version": 3,
        "sha256": "a" * 64,
        "state": "active",
        "probation": {"state": "passed", "requests": 200, "error_rate": 0.0, "p99_ratio": 1.1},
    }
    report.update(fields)
    return report


@pytest.mark.parametrize(
    ("reported", "outcome", "reason"),
    [
        (None, "pending", "not reporting"),
        (_report(version=2), "pending", "not reporting"),
        (_report(), "passed", ""),
        (_report(state="downloading", probation=None), "pending", "downloading"),
        (_report(probation={"state": "watching", "requests": 3}), "pending", "watching"),
        (
            _report(state="rolled_back", reason="probation_errors"),
            "failed",
            "rolled_back: probation_errors",
        ),
        (_report(state="rejected", reason="signature_invalid"), "failed", "signature_invalid"),
        (_report(state="failed", reason="golden_mismatch"), "failed", "golden_mismatch"),
        (_report(probation={"state": "failed"}), "failed", "probation failed"),
        (
            _report(probation={"state": "passed", "error_rate": 0.2, "p99_ratio": 1.0}),
            "failed",
            "error rate 0.2",
        ),
        (
            _report(probation={"state": "passed", "error_rate": 0.0, "p99_ratio": 4.5}),
            "failed",
            "p99 ratio 4.5",
        ),
        (_report(drift={"version": 3, "state": "drift"}), "failed", "drift alarm"),
        (
            _report(probation={"state": "watching"}, drift={"version": 3, "state": "drift"}),
            "failed",
            "drift alarm",
        ),
        # The release still downloads: the drift is the previous release's, not its own.
        (
            _report(state="downloading", probation=None, drift={"version": 2, "state": "drift"}),
            "pending",
            "",
        ),
        # A section that does not say whose watch it is counts against no release.
        (_report(drift={"state": "drift"}), "passed", ""),
        (_report(drift={"version": 3, "state": "warning"}), "passed", ""),
        (_report(probation={"state": "passed", "error_rate": True}), "passed", ""),
    ],
)
def test_judge_device(reported: dict[str, Any] | None, outcome: str, reason: str) -> None:
    verdict = gate.judge_device("d1", reported, 3, BOUNDS)
    assert verdict.outcome == outcome
    assert reason in verdict.reason


QUIET = {"state": "passed_without_traffic", "requests": 0, "error_rate": 0.0, "p99_ratio": None}


@pytest.mark.parametrize(
    ("probation", "allow", "outcome", "reason", "without_traffic"),
    [
        (_report()["probation"], False, "passed", "", False),
        (_report()["probation"], True, "passed", "", False),
        (QUIET, False, "failed", "saw no traffic during probation", False),
        (QUIET, True, "passed", "saw no traffic", True),
    ],
)
def test_the_gate_refuses_a_probation_without_traffic_unless_allowed(
    probation: dict[str, Any], allow: bool, outcome: str, reason: str, without_traffic: bool
) -> None:
    bounds = gate.GateBounds(allow_no_traffic=allow)
    verdict = gate.judge_device("d1", _report(probation=probation), 3, bounds)
    assert (verdict.outcome, verdict.without_traffic) == (outcome, without_traffic)
    assert reason in verdict.reason
    if outcome == "failed":
        assert "--allow-no-traffic" in verdict.reason


def test_a_gate_counts_the_devices_it_passed_without_traffic() -> None:
    verdicts = [
        gate.DeviceVerdict("d0", "passed"),
        gate.DeviceVerdict("d1", "passed", "saw no traffic", without_traffic=True),
    ]
    result = gate.judge_gate(verdicts, 2)
    assert (result.outcome, result.passed, result.without_traffic) == ("passed", 2, 1)


def _verdicts(*outcomes: str) -> list[gate.DeviceVerdict]:
    return [gate.DeviceVerdict(f"d{i}", o, "why") for i, o in enumerate(outcomes)]


@pytest.mark.parametrize(
    ("outcomes", "required", "expected"),
    [
        (("passed", "passed"), 2, "passed"),
        (("passed", "pending"), 2, "waiting"),
        (("passed", "pending"), 1, "passed"),
        (("passed", "failed"), 1, "failed"),
        ((), 1, "waiting"),
    ],
)
def test_judge_gate(outcomes: tuple[str, ...], required: int, expected: str) -> None:
    assert gate.judge_gate(_verdicts(*outcomes), required).outcome == expected


@pytest.mark.parametrize(
    ("targeted", "fraction", "required"),
    [(0, 1.0, 0), (1, 0.5, 1), (10, 1.0, 10), (10, 0.9, 9), (1000, 0.99, 990), (3, 0.5, 2)],
)
def test_required_devices(targeted: int, fraction: float, required: int) -> None:
    assert gate.required_devices(targeted, fraction) == required


def test_earlier_rings_have_higher_priority() -> None:
    rings = rollout.rings_from_config({"canary": "a", "early": "b", "all": "c"})
    assert [r.priority for r in rings] == sorted((r.priority for r in rings), reverse=True)
    assert min(r.priority for r in rings) > 0  # the base deployment keeps priority 0


def test_unknown_or_repeated_rings_are_usage_errors() -> None:
    rings = rollout.rings_from_config({"canary": "a", "all": "c"})
    with pytest.raises(PublisherError, match="unknown ring"):
        rollout.select_rings(rings, ["canary", "early"])
    with pytest.raises(PublisherError, match="twice"):
        rollout.select_rings(rings, ["canary", "canary"])
    assert [r.name for r in rollout.select_rings(rings, ["all"])] == ["all"]


def test_a_layer_owns_only_the_models_path_of_the_agent() -> None:
    ring = rollout.Ring("canary", "tags.ring = 'canary'", 30)
    layer = rollout.layered_deployment("tiny", ring, 3, MANIFEST, "mlagent")
    assert layer.modules_content == {"mlagent": {"properties.desired.models.tiny": MANIFEST}}
    assert layer.target_condition == "tags.ring = 'canary'"
    assert layer.priority == 30
    assert layer.labels == {"edgeml-model": "tiny", "edgeml-ring": "canary", "edgeml-version": "3"}
    assert set(layer.metric_queries) == {"reported", "passed", "failed"}
    # Deterministic for resumption, new for a re-signed manifest (content is immutable).
    assert layer.id == rollout.layered_deployment("tiny", ring, 3, MANIFEST, "mlagent").id
    resigned = {**MANIFEST, "signature": {"key_id": "k", "value": "b3RoZXI="}}
    assert rollout.config_id("tiny", "canary", 3, resigned) != layer.id


@pytest.mark.parametrize("name", ["tiny", "model_2", "A1"])
def test_queryable_model_names(name: str) -> None:
    rollout.check_model_name(name)


@pytest.mark.parametrize("name", ["my-model", "1model", "a.b", "x y", ""])
def test_names_a_twin_query_cannot_address_are_refused(name: str) -> None:
    with pytest.raises(PublisherError) as caught:
        rollout.check_model_name(name)
    assert caught.value.reason == Reason.USAGE


def test_progress_replays_the_audit_log(tmp_path: Path) -> None:
    audit = AuditLog(
        tmp_path / "audit.jsonl", actor="t", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )
    audit.append("release.start", "tiny:3", "started", rings=["canary", "all"])
    audit.append("release.ring", "tiny:3", "applied", ring="canary", previous_version=2)
    audit.append("release.gate", "tiny:3", "passed", ring="canary")
    audit.append("release.ring", "tiny:3", "applied", ring="all", previous_version=None)
    audit.append("release.ring", "tiny:4", "applied", ring="canary", previous_version=3)
    progress = journal.progress_of(audit.entries(), "tiny:3")
    assert progress.applied == {"canary", "all"}
    assert progress.gated == {"canary"}
    assert progress.previous == {"canary": 2, "all": None}
    assert not progress.finished
    assert progress.halted is None
    audit.append("release.halted", "tiny:3", "halted", ring="all", why="d1: rolled_back")
    assert journal.progress_of(audit.entries(), "tiny:3").halted is not None


def test_a_ring_variable_names_the_ring_in_one_module() -> None:
    ring = rollout.Ring("canary", "tags.ring = 'canary'", 30)
    layer = rollout.layered_deployment(
        "tiny", ring, 3, MANIFEST, "mlagent", ring_variable=("prometheus", "EDGE_RING")
    )
    assert layer.modules_content["$edgeAgent"] == {
        "properties.desired.modules.prometheus.env.EDGE_RING": {"value": "canary"}
    }


@pytest.mark.parametrize(
    ("version", "released", "refused"),
    [
        (1, {}, False),  # nothing sent yet
        (3, {1: "canary", 2: "canary"}, False),
        (2, {1: "canary", 2: "canary"}, False),  # the same release: a rerun resumes it
        (1, {1: "canary", 3: "canary"}, True),  # v2 halted, v3 its rollback: v1 is behind
        (2, {3: "all"}, True),
    ],
)
def test_a_release_below_what_the_fleet_was_sent_is_refused(
    version: int, released: dict[int, str], refused: bool
) -> None:
    if not refused:
        journal.check_newer_than_released("tiny", version, released)
        return
    with pytest.raises(PublisherError) as caught:
        journal.check_newer_than_released("tiny", version, released)
    assert caught.value.reason == Reason.VERSION_NOT_MONOTONIC
    highest = max(released)
    assert f"tiny:{version} is below tiny:{highest}" in caught.value.message
    assert "version_not_monotonic" in caught.value.message
    assert "edgeml register FILE --name tiny)" in caught.value.message


def test_released_versions_and_unfinished_halts_replay_the_audit_log(tmp_path: Path) -> None:
    audit = AuditLog(
        tmp_path / "audit.jsonl", actor="t", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )
    audit.append("release.ring", "tiny:1", "applied", ring="canary", previous_version=None)
    audit.append("release.ring", "tiny:2", "applied", ring="canary", previous_version=1)
    audit.append("release.ring", "other:9", "applied", ring="canary", previous_version=None)
    audit.append("release.halt", "tiny:2", "started", ring="canary", reached=[])
    audit.append("release.halt", "other:9", "started", ring="canary", reached=[])
    audit.append(
        "release.rollback", "tiny:2", "rereleased", ring="canary", restored_version=1, as_version=3
    )
    audit.append("release.halted", "tiny:2", "halted", ring="canary")
    assert journal.released_versions(audit.entries(), "tiny") == {
        1: "canary",
        2: "canary",
        3: "canary",
    }
    assert journal.halting_subjects(audit.entries()) == ["other:9"]
    progress = journal.progress_of(audit.entries(), "tiny:2")
    assert progress.restored == {"canary"}
    assert not progress.halting
    assert journal.progress_of(audit.entries(), "other:9").halting

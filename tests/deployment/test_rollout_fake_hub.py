"""Rollout decisions against an in-memory hub: what is written, audited and undone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deployment.errors import PublisherError, Reason
from deployment.publish import gate, rollout
from deployment.publish.audit import AuditLog, Entry
from deployment.publish.hub_client import LayeredDeployment
from tests.support.clock import FakeClock
from tests.support.fake_service_hub import FakeHub

MANIFEST = {"name": "m", "version": 2, "signature": {"key_id": "k", "value": "c2ln"}}
RINGS = rollout.rings_from_config({"canary": "tags.ring = 'canary'", "all": "tags.all = 1"})
BOUNDS = gate.GateBounds(timeout_s=10, poll_s=1)


class Killed(BaseException):
    """The publisher process dies here: no handler runs, nothing more is written."""


class KillingAudit(AuditLog):
    """An audit log whose process is killed right after it writes the ``nth`` entry that
    matches ``action`` (and ``outcome``, unless None): a journal point of a halt."""

    def __init__(self, path: Path, action: str, outcome: str | None, nth: int = 1) -> None:
        super().__init__(path, actor="t", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
        self._kill = (action, outcome)
        self._left = nth

    def append(self, action: str, subject: str, outcome: str, **details: Any) -> Entry:
        entry = super().append(action, subject, outcome, **details)
        if self._kill in ((action, outcome), (action, None)):
            self._left -= 1
            if self._left == 0:
                raise Killed(f"killed after {action} {outcome}")
        return entry


class FakeRegistry:
    """Re-releases as the publisher makes them: one new version per halt, found again by its
    lineage when a rerun asks for the same one (``kill_after_register``: die right after)."""

    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []  # (previous, as version)
        self.kill_after_register = False

    def rerelease(self, model: str, bad: int, previous: int) -> tuple[int, Mapping[str, Any]]:
        found = [new for old, new in self.registered if old == previous]
        if not found:
            self.registered.append((previous, bad + 1 + len(self.registered)))
            if self.kill_after_register:
                raise Killed("killed after registering, before the journal says so")
        version = found[0] if found else self.registered[-1][1]
        return version, {**MANIFEST, "version": version}


def _rollout(
    hub: FakeHub,
    tmp_path: Path,
    aliases: dict[str, int],
    clock: FakeClock,
    *,
    audit: AuditLog | None = None,
    registry: FakeRegistry | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[rollout.Rollout, AuditLog, list[int]]:
    audit = audit or AuditLog(
        tmp_path / "audit.jsonl", actor="t", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )
    registry = registry or FakeRegistry()
    rereleased: list[int] = []

    def rerelease(model: str, bad: int, previous: int) -> tuple[int, Mapping[str, Any]]:
        before = len(registry.registered)
        try:
            return registry.rerelease(model, bad, previous)
        finally:
            rereleased.extend(p for p, _ in registry.registered[before:])

    runner = rollout.Rollout(
        hub,
        audit,
        module="mlagent",
        alias_of=lambda _m, ring: aliases.get(ring),
        set_alias=lambda _m, ring, version: aliases.__setitem__(ring, version),
        rerelease=rerelease,
        clock=clock,
        sleep=clock.sleep,
        report=report,
    )
    return runner, audit, rereleased


def _fleet() -> FakeHub:
    hub = FakeHub()
    hub.devices = {"tags.ring = 'canary'": ["a"], "tags.all = 1": ["a", "b"]}
    return hub


def _passed() -> dict[str, Any]:
    return {"version": 2, "state": "active", "probation": {"state": "passed"}}


def test_a_gate_that_never_passes_times_out_and_removes_a_first_release(tmp_path: Path) -> None:
    hub, clock = _fleet(), FakeClock()
    runner, audit, rereleased = _rollout(hub, tmp_path, {}, clock)
    hub.reports = {"a": {"version": 2, "state": "downloading"}}
    with pytest.raises(PublisherError) as caught:
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    assert caught.value.reason == Reason.GATE_TIMEOUT
    assert clock.now >= BOUNDS.timeout_s
    assert hub.layers == {}  # no previous release: the ring's layer is removed
    assert rereleased == []
    outcomes = [(e.action, e.outcome) for e in audit.entries()]
    assert ("release.gate", "timeout") in outcomes
    assert ("release.rollback", "removed") in outcomes


def test_an_offline_device_does_not_stop_the_rollback(tmp_path: Path) -> None:
    hub, clock = _fleet(), FakeClock()
    runner, audit, rereleased = _rollout(hub, tmp_path, {"canary": 1, "all": 1}, clock)
    hub.reports = {"a": {"version": 2, "state": "rolled_back", "reason": "probation"}}
    hub.offline = {"a"}
    with pytest.raises(PublisherError) as caught:
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    assert caught.value.reason == Reason.GATE_FAILED
    assert rereleased == [1]
    layers = list(hub.layers.values())
    assert [layer.labels[rollout.LABEL_VERSION] for layer in layers] == ["3"]
    outcomes = [(e.action, e.outcome) for e in audit.entries()]
    assert ("release.rollback_method", "unreachable") in outcomes
    assert ("release.rollback", "rereleased") in outcomes


def test_an_unreachable_hub_mid_gate_is_audited_and_a_rerun_resumes(tmp_path: Path) -> None:
    hub, clock = _fleet(), FakeClock()
    aliases: dict[str, int] = {}
    runner, audit, _ = _rollout(hub, tmp_path, aliases, clock)
    hub.reports = {"a": _passed()}
    hub.reports_unreachable = True
    with pytest.raises(PublisherError, match="query failed"):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    entries = [(e.action, e.outcome) for e in audit.entries()]
    assert entries[-2:] == [("release.ring", "applied"), ("release.interrupted", "unreachable")]
    hub.reports_unreachable = False
    hub.reports = {"a": _passed(), "b": _passed()}
    created_before = len(hub.layers)
    assert runner.release("m", 2, MANIFEST, RINGS, BOUNDS) == "released"
    applied = [e for e in audit.entries() if e.action == "release.ring"]
    assert [e.details["ring"] for e in applied] == ["canary", "all"]  # canary not re-applied
    assert len(hub.layers) == created_before + 1
    assert aliases == {"canary": 2, "all": 2}
    assert runner.release("m", 2, MANIFEST, RINGS, BOUNDS) == "unchanged"


def test_hub_calls_do_not_grow_with_the_fleet(tmp_path: Path) -> None:
    counts = []
    for size in (10, 1000):
        hub, clock = FakeHub(), FakeClock()
        devices = [f"d{i}" for i in range(size)]
        hub.devices = {"tags.ring = 'canary'": devices[:1], "tags.all = 1": devices}
        hub.reports = {d: _passed() for d in devices}
        runner, _, _ = _rollout(hub, tmp_path / str(size), {}, clock)
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
        counts.append(hub.calls)
    assert counts[0] == counts[1]


def test_a_halt_at_a_later_ring_re_releases_the_previous_version_once(tmp_path: Path) -> None:
    hub, clock = _fleet(), FakeClock()
    runner, _, rereleased = _rollout(hub, tmp_path, {"canary": 1, "all": 1}, clock)
    hub.reports = {
        "a": _passed(),
        "b": {"version": 2, "state": "rolled_back", "reason": "probation"},
    }
    with pytest.raises(PublisherError) as caught:
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    assert caught.value.reason == Reason.GATE_FAILED
    assert rereleased == [1]  # canary and all both ran version 1
    layers = sorted(hub.layers.values(), key=lambda layer: layer.labels[rollout.LABEL_RING])
    assert [layer.labels[rollout.LABEL_VERSION] for layer in layers] == ["3", "3"]


# ------------------------------------------------------------------------------ halts resumed


def _halting_fleet() -> FakeHub:
    """The canary passes, the broad ring fails: the halt restores both rings from v1."""
    hub = _fleet()
    hub.reports = {
        "a": _passed(),
        "b": {"version": 2, "state": "rolled_back", "reason": "probation"},
    }
    return hub


def _halt_steps(audit: AuditLog) -> list[tuple[str, str]]:
    return [
        (e.action, e.outcome)
        for e in audit.entries()
        if e.action in ("release.halt", "release.halted", "release.interrupted")
    ]


def _assert_restored(
    hub: FakeHub, audit: AuditLog, aliases: dict[str, int], registry: FakeRegistry
) -> None:
    """Both rings run the one re-release of v1, each device was asked to roll back once,
    and the journal shows the halt decided once and finished once."""
    assert registry.registered == [(1, 3)]
    layers = sorted(hub.layers.values(), key=lambda layer: layer.labels[rollout.LABEL_RING])
    assert [(x.labels[rollout.LABEL_RING], x.labels[rollout.LABEL_VERSION]) for x in layers] == [
        ("all", "3"),
        ("canary", "3"),
    ]
    assert aliases == {"canary": 3, "all": 3}
    assert sorted(hub.methods) == [("a", "rollback"), ("b", "rollback")]
    steps = _halt_steps(audit)
    assert steps.count(("release.halt", "started")) == 1
    assert steps[-1] == ("release.halted", "halted")
    assert steps.count(("release.halted", "halted")) == 1
    rollbacks = [e.details["ring"] for e in audit.entries() if e.action == "release.rollback"]
    assert sorted(rollbacks) == ["all", "canary"]
    audit.verify()


JOURNAL_POINTS = [
    ("release.halt", "started", 1),
    ("release.rollback_method", None, 1),
    ("release.rollback_method", None, 2),
    ("release.rerelease", "registered", 1),
    ("release.rollback", "rereleased", 1),
    ("release.rollback", "rereleased", 2),
]


@pytest.mark.parametrize(("action", "outcome", "nth"), JOURNAL_POINTS)
@pytest.mark.parametrize("rerun", ["release", "repair"])
def test_a_halt_killed_at_any_journal_point_is_finished_by_a_rerun(
    tmp_path: Path, action: str, outcome: str | None, nth: int, rerun: str
) -> None:
    hub, clock, registry = _halting_fleet(), FakeClock(), FakeRegistry()
    aliases = {"canary": 1, "all": 1}
    killing = KillingAudit(tmp_path / "audit.jsonl", action, outcome, nth)
    runner, _, _ = _rollout(hub, tmp_path, aliases, clock, audit=killing, registry=registry)
    with pytest.raises(Killed):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    runner, audit, _ = _rollout(hub, tmp_path, aliases, clock, registry=registry)
    assert ("release.halted", "halted") not in _halt_steps(audit)
    if rerun == "release":
        with pytest.raises(PublisherError) as caught:
            runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
        assert caught.value.reason == Reason.HALTED
        assert "finished now" in caught.value.message
    else:
        assert runner.repair() == ["m:2"]
        assert runner.repair() == []
    _assert_restored(hub, audit, aliases, registry)
    assert ("release.halt", "resumed") in _halt_steps(audit)


def test_a_halt_killed_between_registering_and_journalling_registers_once(
    tmp_path: Path,
) -> None:
    hub, clock, registry = _halting_fleet(), FakeClock(), FakeRegistry()
    aliases = {"canary": 1, "all": 1}
    runner, audit, _ = _rollout(hub, tmp_path, aliases, clock, registry=registry)
    registry.kill_after_register = True
    with pytest.raises(Killed):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    registry.kill_after_register = False
    with pytest.raises(PublisherError, match="finished now"):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    _assert_restored(hub, audit, aliases, registry)


def test_a_hub_outage_during_a_halt_is_interrupted_and_a_rerun_finishes_it(
    tmp_path: Path,
) -> None:
    hub, clock, registry = _halting_fleet(), FakeClock(), FakeRegistry()
    aliases = {"canary": 1, "all": 1}
    runner, audit, _ = _rollout(hub, tmp_path, aliases, clock, registry=registry)
    real_create = hub.create_configuration

    def create_then_fail(deployment: LayeredDeployment) -> None:
        if deployment.labels[rollout.LABEL_VERSION] == "3":  # the re-release's layer
            hub.creates_unreachable = True
        real_create(deployment)

    hub.create_configuration = create_then_fail  # type: ignore[method-assign]
    with pytest.raises(PublisherError) as caught:
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    assert caught.value.reason == Reason.UNREACHABLE
    interrupted = [e for e in audit.entries() if e.action == "release.interrupted"]
    assert [(e.outcome, e.details["step"]) for e in interrupted] == [("unreachable", "halt")]
    assert ("release.halted", "halted") not in _halt_steps(audit)
    hub.create_configuration = real_create  # type: ignore[method-assign]
    hub.creates_unreachable = False
    with pytest.raises(PublisherError, match="finished now"):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    _assert_restored(hub, audit, aliases, registry)


def test_a_finished_halt_refuses_a_rerun_and_changes_nothing(tmp_path: Path) -> None:
    hub, clock = _halting_fleet(), FakeClock()
    aliases = {"canary": 1, "all": 1}
    runner, audit, rereleased = _rollout(hub, tmp_path, aliases, clock)
    with pytest.raises(PublisherError):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    count, calls = len(list(audit.entries())), hub.calls
    with pytest.raises(PublisherError) as caught:
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    assert caught.value.reason == Reason.HALTED
    assert "finished now" not in caught.value.message
    assert (len(list(audit.entries())), hub.calls, rereleased) == (count, calls, [1])
    assert runner.repair() == []


def test_after_a_halt_the_version_it_restored_is_refused_by_name(tmp_path: Path) -> None:
    """v1 released, v2 halted (canary now runs v1's bytes as v3): releasing v1 again would
    write a layer every device refuses, so it is refused before anything is written."""
    hub, clock = _fleet(), FakeClock()
    aliases: dict[str, int] = {}
    runner, audit, _ = _rollout(hub, tmp_path, aliases, clock)
    first = {**MANIFEST, "version": 1}
    hub.reports = {"a": {**_passed(), "version": 1}}
    assert runner.release("m", 1, first, RINGS[:1], BOUNDS) == "released"
    hub.reports = {"a": {"version": 2, "state": "rolled_back", "reason": "probation"}}
    with pytest.raises(PublisherError):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    layers, count = dict(hub.layers), len(list(audit.entries()))
    for attempt in (
        lambda: runner.release("m", 1, first, RINGS[:1], BOUNDS),
        lambda: runner.plan("m", 1, first, RINGS[:1]),
    ):
        with pytest.raises(PublisherError) as caught:
            attempt()
        assert caught.value.reason == Reason.VERSION_NOT_MONOTONIC
        assert "m:1 is below m:3, already sent to ring 'canary'" in caught.value.message
    assert (hub.layers, len(list(audit.entries()))) == (layers, count)
    with pytest.raises(PublisherError) as halted:
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)  # its own re-release is above it
    assert halted.value.reason == Reason.HALTED


@pytest.mark.parametrize(
    ("label", "version", "own_only", "removable"),
    [
        ("1", 2, False, True),  # an older release's layer is replaced
        ("2", 2, False, True),  # this release's own, re-signed
        ("3", 2, False, False),  # a newer release's layer: not ours to replace
        ("2", 2, True, True),  # a rollback removes its own layer
        ("3", 2, True, False),  # … and nobody else's
        ("1", 2, True, False),
        (None, 2, False, False),  # not written by this publisher
        ("x", 2, False, False),
    ],
)
def test_a_step_removes_only_layers_it_may(
    label: str | None, version: int, own_only: bool, removable: bool
) -> None:
    assert rollout.may_remove(label, version, own_only=own_only) is removable


def test_a_rollback_leaves_a_newer_release_s_layer_on_the_ring(tmp_path: Path) -> None:
    """Two controllers released v2 and v3 together: v3 replaced v2's canary layer while v2's
    gate waited; v2's rollback then must not delete v3's layer."""
    manifest3 = {**MANIFEST, "version": 3, "signature": {"key_id": "k", "value": "djM="}}

    class RacingHub(FakeHub):
        def query(self, text: str) -> list[dict[str, Any]]:
            if text.startswith("SELECT * FROM devices.modules") and not other_done:
                other_done.append(True)
                other._put_layer("m", RINGS[0], 3, manifest3)  # the other controller's step
            return super().query(text)

    other_done: list[bool] = []
    hub, clock = RacingHub(), FakeClock()
    hub.devices = _fleet().devices
    runner, audit, _ = _rollout(hub, tmp_path, {}, clock)
    other, _, _ = _rollout(hub, tmp_path / "other", {}, clock)
    hub.reports = {"a": {"version": 2, "state": "downloading"}}
    with pytest.raises(PublisherError):
        runner.release("m", 2, MANIFEST, RINGS, BOUNDS)
    assert other_done
    assert [layer.labels[rollout.LABEL_VERSION] for layer in hub.layers.values()] == ["3"]
    removed = [e for e in audit.entries() if e.action == "release.rollback"]
    assert [e.details["removed"] for e in removed] == [[]]


def test_the_plan_is_done_only_where_the_hub_carries_the_planned_layer(tmp_path: Path) -> None:
    hub, clock = _fleet(), FakeClock()
    runner, _, _ = _rollout(hub, tmp_path, {}, clock)
    hub.reports = {"a": _passed(), "b": _passed()}
    assert runner.release("m", 2, MANIFEST, RINGS, BOUNDS) == "released"
    assert [p.done for p in runner.plan("m", 2, MANIFEST, RINGS)] == [True, True]
    resigned = {**MANIFEST, "signature": {"key_id": "k", "value": "bmV3"}}
    planned = runner.plan("m", 2, resigned, RINGS)
    assert [p.done for p in planned] == [False, False]
    assert all(p.config_id not in hub.layers for p in planned)


class StepwiseHub(FakeHub):
    """A hub whose devices move on one poll at a time: the reports of ``steps[i]`` answer
    the ``i``-th gate query, the last one for every query after it."""

    def __init__(self, steps: list[dict[str, Mapping[str, Any]]]) -> None:
        super().__init__()
        self.steps = steps
        self.polls = 0

    def query(self, text: str) -> list[dict[str, Any]]:
        if text.startswith("SELECT * FROM devices.modules"):
            self.reports = self.steps[min(self.polls, len(self.steps) - 1)]
            self.polls += 1
        return super().query(text)


def _probation(requests: int) -> dict[str, Any]:
    return {
        "version": 2,
        "state": "active",
        "probation": {"state": "watching", "requests": requests},
    }


def _released_with_progress(
    hub: FakeHub, tmp_path: Path, aliases: dict[str, int], bounds: gate.GateBounds
) -> tuple[list[str], PublisherError | None]:
    clock = FakeClock()
    lines: list[str] = []
    runner, _, _ = _rollout(hub, tmp_path, aliases, clock, report=lines.append)
    try:
        runner.release("m", 2, MANIFEST, RINGS[:1], bounds)
    except PublisherError as e:
        return lines, e
    return lines, None


def test_a_gate_reports_each_change_at_most_once_per_interval(tmp_path: Path) -> None:
    downloading: dict[str, Mapping[str, Any]] = {"a": {"version": 2, "state": "downloading"}}
    steps: list[dict[str, Mapping[str, Any]]] = [
        downloading,
        downloading,  # unchanged: not repeated
        {"a": _probation(3)},
        {"a": _probation(12)},
        {"a": _passed()},
    ]
    hub = StepwiseHub(steps)
    hub.devices = _fleet().devices
    lines, error = _released_with_progress(
        hub, tmp_path, {}, gate.GateBounds(timeout_s=10, poll_s=0.5)
    )
    assert error is None
    # Polled every 0.5 s: the change at 1.0 s shows, the one at 1.5 s is held back until
    # the next change after the interval, and the verdict shows at once.
    assert lines == [
        "canary: 0/1 active, probation -, 0/1 passed",
        "canary: 1/1 active, probation 3 requests, 0/1 passed",
        "canary: 1/1 active, probation -, 1/1 passed",
    ]


def test_a_failed_gate_says_what_the_device_said_and_which_version_it_restored(
    tmp_path: Path,
) -> None:
    failed = {
        "version": 2,
        "state": "rolled_back",
        "reason": "probation_errors",
        "message": "error rate 0.4 over 0.05",
    }
    hub = StepwiseHub([{"a": failed}])
    hub.devices = _fleet().devices
    lines, error = _released_with_progress(hub, tmp_path, {"canary": 1}, BOUNDS)
    assert error is not None
    assert error.reason == Reason.GATE_FAILED
    assert (
        "canary: a failed: rolled_back: probation_errors; the device says: error rate 0.4 over 0.05"
        in lines
    )
    assert lines[-1] == "canary: rolled back to v1, re-released as v3"


def test_a_gate_that_times_out_says_so(tmp_path: Path) -> None:
    hub = StepwiseHub([{"a": {"version": 2, "state": "downloading"}}])
    hub.devices = _fleet().devices
    lines, error = _released_with_progress(hub, tmp_path, {}, BOUNDS)
    assert error is not None
    assert error.reason == Reason.GATE_TIMEOUT
    assert lines == [
        "canary: 0/1 active, probation -, 0/1 passed",
        "canary: timed out after 10 s, 0/1 passed",
        "canary: removed the layer of v2 (none before it)",
    ]

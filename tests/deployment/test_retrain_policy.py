"""The retraining controller's decisions, from tables."""

from __future__ import annotations

import pytest

from deployment.retrain.policy import (
    ControllerState,
    FleetSignal,
    Hold,
    RetrainPolicy,
    Trigger,
    decide,
    promotion_gate,
)

POLICY = RetrainPolicy(
    schedule_s=86_400.0, cooldown_s=600.0, min_drifting_devices=2, sustain_polls=2
)
IDLE = ControllerState(last_started=0.0, last_scheduled=0.0, seen_data=frozenset({"a.csv"}))
QUIET = FleetSignal(devices=10, drifting=0)
DRIFTING = FleetSignal(devices=10, drifting=4)


@pytest.mark.parametrize(
    ("now", "state", "signal", "data", "expected"),
    [
        # Nothing new, not due: nothing to do.
        (1_000.0, IDLE, QUIET, {"a.csv"}, (None, Hold.NOTHING)),
        # One noisy device: never a trigger, whatever its streak.
        (1_000.0, IDLE, FleetSignal(10, 1), {"a.csv"}, (None, Hold.FEW_DEVICES)),
        # Two devices of a thousand: under the share.
        (1_000.0, IDLE, FleetSignal(1000, 2), {"a.csv"}, (None, Hold.FEW_DEVICES)),
        # A fleet signal on its first poll only: wait for it to hold.
        (1_000.0, IDLE, DRIFTING, {"a.csv"}, (None, Hold.NOT_SUSTAINED)),
        # ... and on its second poll it triggers.
        (1_000.0, ControllerState(0.0, 0.0, 1), DRIFTING, set(), (Trigger.DRIFT, None)),
        # Sustained drift inside the cooldown waits.
        (100.0, ControllerState(0.0, 0.0, 1), DRIFTING, set(), (None, Hold.COOLDOWN)),
        # New labelled data.
        (1_000.0, IDLE, QUIET, {"a.csv", "b.csv"}, (Trigger.NEW_DATA, None)),
        # The schedule is due.
        (90_000.0, IDLE, QUIET, {"a.csv"}, (Trigger.SCHEDULE, None)),
        # A first start with no history and a schedule.
        (5.0, ControllerState(), QUIET, set(), (Trigger.SCHEDULE, None)),
        # Drift outranks the other triggers when several hold at once.
        (90_000.0, ControllerState(0.0, 0.0, 1), DRIFTING, {"z.csv"}, (Trigger.DRIFT, None)),
    ],
)
def test_decide(
    now: float,
    state: ControllerState,
    signal: FleetSignal,
    data: set[str],
    expected: tuple[Trigger | None, Hold | None],
) -> None:
    decision = decide(now, state, signal, frozenset(data), POLICY)
    assert (decision.trigger, decision.hold) == expected


STREAMING = RetrainPolicy(
    cooldown_s=600.0, min_drifting_devices=2, sustain_polls=2, retrain_on_new_data=False
)


@pytest.mark.parametrize(
    ("state", "signal", "expected"),
    [
        # Data streams in all the time: its arrival alone starts nothing ...
        (IDLE, QUIET, (None, Hold.NOTHING)),
        (IDLE, DRIFTING, (None, Hold.NOT_SUSTAINED)),
        # ... sustained drift does, and the job takes the new data along.
        (
            ControllerState(0.0, 0.0, 1, seen_data=frozenset({"a.csv"})),
            DRIFTING,
            (Trigger.DRIFT, None),
        ),
    ],
)
def test_new_data_waits_for_drift_when_it_is_no_trigger(
    state: ControllerState, signal: FleetSignal, expected: tuple[Trigger | None, Hold | None]
) -> None:
    decision = decide(1_000.0, state, signal, frozenset({"a.csv", "b.csv"}), STREAMING)
    assert (decision.trigger, decision.hold) == expected
    assert ("b.csv" in decision.state.seen_data) is (decision.trigger is not None)


def test_a_started_job_marks_its_data_seen_and_resets_the_streak() -> None:
    decision = decide(1_000.0, ControllerState(0.0, 0.0, 5), DRIFTING, frozenset({"b.csv"}), POLICY)
    assert decision.trigger is Trigger.DRIFT
    assert decision.state.drift_streak == 0
    assert decision.state.seen_data == {"b.csv"}
    assert decision.state.last_started == 1_000.0


@pytest.mark.parametrize(
    ("states", "devices", "drifting"),
    [
        ({}, 0, 0),
        ({"d1": "ok", "d2": "warning"}, 2, 0),
        ({"d1": "drift", "d2": "ok", "d3": "drift"}, 3, 2),
    ],
)
def test_fleet_signal_counts_drift_states(
    states: dict[str, str], devices: int, drifting: int
) -> None:
    assert FleetSignal.from_states(states) == FleetSignal(devices, drifting)


@pytest.mark.parametrize(
    ("candidate_window", "champion_window", "candidate_holdout", "champion_holdout", "reason"),
    [
        (0.92, 0.71, 0.915, 0.928, "better"),
        (0.72, 0.71, 0.93, 0.928, "no_gain_on_recent_data"),
        (0.60, 0.71, 0.93, 0.928, "no_gain_on_recent_data"),
        (0.92, 0.71, 0.85, 0.928, "worse_on_holdout"),
        (0.73, 0.71, 0.908, 0.928, "better"),
    ],
)
def test_promotion_gate(
    candidate_window: float,
    champion_window: float,
    candidate_holdout: float,
    champion_holdout: float,
    reason: str,
) -> None:
    result = promotion_gate(
        candidate_window=candidate_window,
        champion_window=champion_window,
        candidate_holdout=candidate_holdout,
        champion_holdout=champion_holdout,
        policy=POLICY,
    )
    assert result.reason == reason
    assert result.promote is (reason == "better")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schedule_s": 0.0},
        {"cooldown_s": -1.0},
        {"min_drifting_devices": 0},
        {"min_drifting_share": 0.0},
        {"sustain_polls": 0},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetrainPolicy(**kwargs)  # type: ignore[arg-type]

"""When to retrain and whether to promote: the retraining controller's decisions. Pure.

Three triggers: a schedule, labelled data arriving, and drift or a quality drop across the
fleet. The fleet signal must hold on enough devices (a count and a share) for several polls in
a row, so one noisy device or one noisy window starts nothing; a cooldown spaces retrainings.
No second job can start over a running one: the controller decides only when no job is stored,
and resumes a stored one (after a crash) instead.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace


class Trigger(enum.StrEnum):
    SCHEDULE = "schedule"
    NEW_DATA = "new_data"
    DRIFT = "drift"


class Hold(enum.StrEnum):
    """Why no retraining starts this poll."""

    NOTHING = "nothing_to_do"
    COOLDOWN = "cooldown"
    FEW_DEVICES = "too_few_devices_drifting"
    NOT_SUSTAINED = "drift_not_sustained"


@dataclass(frozen=True)
class RetrainPolicy:
    schedule_s: float | None = None
    cooldown_s: float = 3600.0
    min_drifting_devices: int = 2
    min_drifting_share: float = 0.2
    sustain_polls: int = 2
    # False: labelled data arriving starts nothing by itself; it waits for the next retraining
    # that drift or the schedule starts (for data that streams in all the time).
    retrain_on_new_data: bool = True
    # Promotion: the candidate must beat the champion on the drifted window by `min_gain`
    # and may lose at most `max_holdout_loss` on the evaluation holdout.
    min_gain: float = 0.02
    max_holdout_loss: float = 0.02

    def __post_init__(self) -> None:
        if self.schedule_s is not None and self.schedule_s <= 0:
            raise ValueError(f"schedule_s must be positive, got {self.schedule_s}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        if self.min_drifting_devices < 1:
            raise ValueError(f"min_drifting_devices must be >= 1, got {self.min_drifting_devices}")
        if not 0.0 < self.min_drifting_share <= 1.0:
            raise ValueError(f"min_drifting_share must be in (0, 1], got {self.min_drifting_share}")
        if self.sustain_polls < 1:
            raise ValueError(f"sustain_polls must be >= 1, got {self.sustain_polls}")


@dataclass(frozen=True)
class FleetSignal:
    """One poll of the fleet: how many devices report the model, how many of them drift."""

    devices: int
    drifting: int

    @classmethod
    def from_states(cls, states: Mapping[str, str]) -> FleetSignal:
        """From each device's reported drift or quality state (`ok`, `warning`, `drift`)."""
        return cls(len(states), sum(1 for s in states.values() if s == "drift"))

    def alarming(self, policy: RetrainPolicy) -> bool:
        return (
            self.devices > 0
            and self.drifting >= policy.min_drifting_devices
            and self.drifting / self.devices >= policy.min_drifting_share
        )


@dataclass(frozen=True)
class ControllerState:
    """What the controller remembers across polls and restarts (persisted as JSON)."""

    last_started: float | None = None
    last_scheduled: float | None = None
    drift_streak: int = 0
    seen_data: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Decision:
    trigger: Trigger | None
    hold: Hold | None
    state: ControllerState
    new_data: frozenset[str] = frozenset()


def decide(
    now: float,
    state: ControllerState,
    signal: FleetSignal,
    data: frozenset[str],
    policy: RetrainPolicy,
) -> Decision:
    """This poll's decision; `data` names every labelled data file there is now."""
    streak = state.drift_streak + 1 if signal.alarming(policy) else 0
    state = replace(state, drift_streak=streak)
    new_data = data - state.seen_data
    due = policy.schedule_s is not None and (
        state.last_scheduled is None or now - state.last_scheduled >= policy.schedule_s
    )
    trigger = (
        Trigger.DRIFT
        if streak >= policy.sustain_polls
        else Trigger.NEW_DATA
        if new_data and policy.retrain_on_new_data
        else Trigger.SCHEDULE
        if due
        else None
    )
    if trigger is None:
        hold = (
            Hold.NOT_SUSTAINED if streak else Hold.FEW_DEVICES if signal.drifting else Hold.NOTHING
        )
        return Decision(None, hold, state)
    if state.last_started is not None and now - state.last_started < policy.cooldown_s:
        return Decision(None, Hold.COOLDOWN, state)
    started = replace(
        state,
        last_started=now,
        last_scheduled=now if trigger is Trigger.SCHEDULE else state.last_scheduled,
        drift_streak=0,
        seen_data=state.seen_data | new_data,
    )
    return Decision(trigger, None, started, new_data)


@dataclass(frozen=True)
class GateResult:
    promote: bool
    reason: str
    candidate_window: float
    champion_window: float
    candidate_holdout: float
    champion_holdout: float


def promotion_gate(
    *,
    candidate_window: float,
    champion_window: float,
    candidate_holdout: float,
    champion_holdout: float,
    policy: RetrainPolicy,
) -> GateResult:
    """Promote only a candidate better on the recent window and not worse on the holdout."""
    if candidate_window < champion_window + policy.min_gain:
        reason = "no_gain_on_recent_data"
    elif candidate_holdout < champion_holdout - policy.max_holdout_loss:
        reason = "worse_on_holdout"
    else:
        reason = "better"
    return GateResult(
        reason == "better",
        reason,
        candidate_window,
        champion_window,
        candidate_holdout,
        champion_holdout,
    )

"""The states a device reports, one enum each, shared by the agent that sets them and every
reader that branches on them (the rollout gate, the retraining controller, the stand-ins)."""

from __future__ import annotations

import enum
from typing import Final


class ModelState(enum.StrEnum):
    """Where a model name stands (`models.<name>.state`)."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    ACTIVE = "active"
    REJECTED = "rejected"  # the release itself is unacceptable: nothing was fetched or loaded
    FAILED = "failed"  # the release was acceptable but could not be installed
    ROLLED_BACK = "rolled_back"


# A release in one of these did not make it: a ring gate fails on it, the module alerts.
FAILED_STATES: Final = frozenset({ModelState.REJECTED, ModelState.FAILED, ModelState.ROLLED_BACK})


class ProbationState(enum.StrEnum):
    """A new release watched after its swap (`models.<name>.probation.state`)."""

    WATCHING = "watching"
    PASSED = "passed"
    # Kept serving (nothing went wrong) but not evidence of health: a ring gate refuses it
    # unless told to accept releases on devices that saw no traffic.
    PASSED_WITHOUT_TRAFFIC = "passed_without_traffic"
    FAILED = "failed"


class DriftState(enum.StrEnum):
    """The detector's state of the serving release's inputs and outputs, or why it has none
    (`models.<name>.drift.state`)."""

    OK = "ok"
    WARNING = "warning"
    DRIFT = "drift"
    NO_BASELINE = "no_baseline"  # the release carries no baseline pack: nothing to compare
    DISABLED = "disabled"  # drift watching is off in the desired `drift` section


class QualityState(enum.StrEnum):
    """Quality from feedback labels (`models.<name>.quality.state`): the drift detector's
    state machine, its top state named for what it means."""

    OK = "ok"
    WARNING = "warning"
    DEGRADED = "degraded"


class DesiredOutcome(enum.StrEnum):
    """What the agent did with the last desired document (`desired.state`)."""

    APPLIED = "applied"
    REJECTED = "rejected"

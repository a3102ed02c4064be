"""Model lifecycle values: states, bounded reasons, status reports, probation. Pure.

A `ModelStatus` is what the device says about one model name: the module turns each one into
reported properties (and alerts for failures and rollbacks); the HTTP metadata shows it too.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import numpy as np
from pydantic import Field

from agent.config import Section
from agent.observation.metrics import LATENCY_BUCKETS
from agent.observation.profile import quantile
from agent.releases.manifest import Tensor
from agent.serving.contract import V2_TO_NUMPY
from wire.reasons import REJECTING, AgentError, Reason
from wire.reported import ModelEntry, ProbationEntry, RejectedEntry, to_twin

# Re-exported: the agent's code (and agent/profiler.py) names the states from here.
from wire.states import ModelState as ModelState  # noqa: PLC0414 - an explicit re-export
from wire.states import ProbationState as ProbationState  # noqa: PLC0414 - likewise


class SwapError(AgentError):
    """A release (or a rollback) that cannot go ahead; the active model keeps serving."""


def failure_state(reason: Reason) -> ModelState:
    """Where an install that ended for `reason` stands: never acceptable, or not installable."""
    return ModelState.REJECTED if reason in REJECTING else ModelState.FAILED


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """The reported state of one model name (the `model` section of the reported twin)."""

    name: str
    version: int | None
    sha256: str | None
    state: ModelState
    reason: Reason | None
    message: str
    since: datetime
    active_version: int | None = None

    def entry(self) -> ModelEntry:
        """The head of the model's reported entry (`models.<name>`), its sections unset."""
        return ModelEntry(
            version=self.version,
            sha256=self.sha256,
            state=self.state,
            reason=self.reason,
            message=self.message,
            since=self.since,
            active_version=self.active_version,
        )

    def rejected(self) -> RejectedEntry:
        """The status as `rejected.<name>` shows it: no serving version there."""
        return RejectedEntry(**self.entry().model_dump(include=set(RejectedEntry.model_fields)))

    def to_json(self) -> dict[str, object]:
        """The status with its name (metadata, alerts, the rollback method's answer)."""
        return {"name": self.name, **to_twin(self.entry())}


def golden_arrays(tensors: Iterable[Tensor]) -> dict[str, np.ndarray]:
    """The manifest's golden tensors as numpy arrays of their declared datatypes."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.datatype == "BYTES":
            # As str, the form ONNX Runtime takes and returns for tensor(string).
            arrays[tensor.name] = np.array(tensor.data, dtype=np.object_).reshape(tensor.shape)
        else:
            dtype = V2_TO_NUMPY[tensor.datatype]
            arrays[tensor.name] = np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
    return arrays


def golden_mismatches(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], atol: float
) -> list[str]:
    """What differs between the expected and the produced golden outputs (empty: a match)."""
    problems: list[str] = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"output {name!r} missing")
            continue
        if got.shape != want.shape:
            problems.append(f"output {name!r} shape {list(got.shape)}, expected {list(want.shape)}")
            continue
        if np.object_ in (want.dtype, got.dtype):
            if not np.array_equal(got, want):
                problems.append(f"output {name!r} differs")
            continue
        got_f = got.astype(np.float64)
        if not np.isfinite(got_f).all():
            problems.append(f"output {name!r} contains NaN or Inf")
            continue
        worst = float(np.max(np.abs(got_f - want.astype(np.float64)), initial=0.0))
        if worst > atol:
            problems.append(f"output {name!r} differs by {worst:.3g} > atol {atol:.3g}")
    return problems


class ProbationPolicy(Section):
    """How long a new model is watched after a swap, and what rolls it back."""

    requests: int = Field(200, ge=0, alias="probation_requests")
    seconds: float = Field(300.0, ge=0.0, alias="probation_seconds")
    min_requests: int = Field(20, ge=1, alias="probation_min_requests")
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0, alias="probation_max_error_rate")
    max_latency_ratio: float = Field(3.0, ge=1.0, alias="probation_max_latency_ratio")
    tick_s: float = Field(1.0, gt=0.0, le=60.0, alias="probation_tick_s")


@dataclass(frozen=True, slots=True)
class ServingStats:
    """Counters of one loaded model since it started serving."""

    served: int
    failed: int
    latency_total_s: float
    # Request latencies in `agent.observation.metrics.LATENCY_BUCKETS` (empty: none kept).
    latency_counts: tuple[int, ...] = ()

    @property
    def mean_latency_s(self) -> float:
        return self.latency_total_s / self.served if self.served else math.nan

    @property
    def error_rate(self) -> float:
        return self.failed / self.served if self.served else 0.0

    def p99_s(self) -> float | None:
        if not self.latency_counts:
            return None
        return quantile(LATENCY_BUCKETS, self.latency_counts, 0.99)


class Verdict(enum.Enum):
    WATCHING = "watching"
    PASSED = "passed"
    NO_TRAFFIC = "no_traffic"  # the window ended before `min_requests`: nothing was judged
    ERRORS = "errors"
    LATENCY = "latency"


NO_BASELINE: Final = ServingStats(0, 0, 0.0)


_PROBATION_STATES: Final = {
    Verdict.WATCHING: ProbationState.WATCHING,
    Verdict.PASSED: ProbationState.PASSED,
    Verdict.NO_TRAFFIC: ProbationState.PASSED_WITHOUT_TRAFFIC,
    Verdict.ERRORS: ProbationState.FAILED,
    Verdict.LATENCY: ProbationState.FAILED,
}


@dataclass(frozen=True, slots=True)
class ProbationReport:
    """What the twin shows of a probation: a ring gate in the cloud reads exactly this.

    `latency_ratio` (means) is what the judgement uses; `p99_ratio` is the tail, for the gate.
    A ratio is None until both models served `min_requests` (nothing to compare yet).
    """

    state: ProbationState
    requests: int
    error_rate: float
    latency_ratio: float | None
    p99_ratio: float | None
    until: datetime

    def entry(self) -> ProbationEntry:
        """`models.<name>.probation`, rounded for the twin."""
        return ProbationEntry(
            state=self.state,
            requests=self.requests,
            error_rate=round(self.error_rate, 4),
            latency_ratio=_rounded(self.latency_ratio),
            p99_ratio=_rounded(self.p99_ratio),
            until=self.until,
        )

    def to_json(self) -> dict[str, object]:
        return to_twin(self.entry())


def probation_report(
    candidate: ServingStats,
    previous: ServingStats,
    verdict: Verdict,
    policy: ProbationPolicy,
    until: datetime,
) -> ProbationReport:
    """The report of a probation judged `verdict` on these counters. Pure."""
    comparable = candidate.served >= policy.min_requests <= previous.served
    latency_ratio = p99_ratio = None
    if comparable:
        latency_ratio = _ratio(candidate.mean_latency_s, previous.mean_latency_s)
        new_p99, old_p99 = candidate.p99_s(), previous.p99_s()
        if new_p99 is not None and old_p99 is not None:
            p99_ratio = _ratio(new_p99, old_p99)
    return ProbationReport(
        state=_PROBATION_STATES[verdict],
        requests=candidate.served,
        error_rate=candidate.error_rate,
        latency_ratio=latency_ratio,
        p99_ratio=p99_ratio,
        until=until,
    )


def _ratio(new: float, old: float) -> float | None:
    return new / old if old > 0 and math.isfinite(new) and math.isfinite(old) else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def judge_probation(
    candidate: ServingStats,
    previous: ServingStats,
    elapsed_s: float,
    policy: ProbationPolicy,
) -> Verdict:
    """Decide a probation from the new model's counters and the old model's for comparison.

    Errors are judged as soon as `min_requests` were served, so a broken model is caught
    early; latency only at the end, over the whole window, and only against an old model that
    itself served `min_requests` (a first install has nothing to regress from). A probation
    passes only on evidence: the window ends early only once `min_requests` were served too,
    and a window that runs out of time with fewer ends `NO_TRAFFIC`, not `PASSED`.
    """
    served = candidate.served
    if served >= policy.min_requests and candidate.failed / served > policy.max_error_rate:
        return Verdict.ERRORS
    enough = served >= max(policy.requests, policy.min_requests)
    if not enough and elapsed_s < policy.seconds:
        return Verdict.WATCHING
    if served < policy.min_requests:
        return Verdict.NO_TRAFFIC
    if (
        served >= policy.min_requests
        and previous.served >= policy.min_requests
        and candidate.mean_latency_s > policy.max_latency_ratio * previous.mean_latency_s
    ):
        return Verdict.LATENCY
    return Verdict.PASSED

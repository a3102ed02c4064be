"""Pure lifecycle decisions from tables: probation judgement and report, golden comparison."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from agent.releases.lifecycle import (
    NO_BASELINE,
    ModelState,
    ProbationPolicy,
    ServingStats,
    Verdict,
    failure_state,
    golden_mismatches,
    judge_probation,
    probation_report,
)
from wire.reasons import Reason

POLICY = ProbationPolicy(requests=100, seconds=60, min_requests=20, max_latency_ratio=2.0)
OLD = ServingStats(served=50, failed=0, latency_total_s=50 * 0.001)
UNTIL = datetime(2026, 1, 1, tzinfo=UTC)


def stats(served: int, failed: int = 0, mean_s: float = 0.001) -> ServingStats:
    return ServingStats(served, failed, served * mean_s)


@pytest.mark.parametrize(
    ("candidate", "previous", "elapsed_s", "expected"),
    [
        (stats(0), OLD, 0.0, Verdict.WATCHING),
        (stats(19, failed=19), OLD, 1.0, Verdict.WATCHING),  # too few to judge errors
        (stats(20, failed=2), OLD, 1.0, Verdict.ERRORS),  # 10 % > 5 % as soon as judgeable
        (stats(20, failed=1), OLD, 1.0, Verdict.WATCHING),  # 5 % is not over 5 %
        (stats(50, mean_s=0.01), OLD, 1.0, Verdict.WATCHING),  # latency judged at the end only
        (stats(100, mean_s=0.0021), OLD, 1.0, Verdict.LATENCY),
        (stats(100, mean_s=0.002), OLD, 1.0, Verdict.PASSED),  # 2x is not over 2x
        (stats(30, mean_s=0.01), OLD, 60.0, Verdict.LATENCY),  # the window ended by time
        (stats(100, mean_s=0.01), NO_BASELINE, 1.0, Verdict.PASSED),  # nothing to regress from
        (stats(100, mean_s=0.01), stats(19), 1.0, Verdict.PASSED),  # old served too little
        # A window that ran out of time passes only on its minimum of requests.
        (stats(0), OLD, 60.0, Verdict.NO_TRAFFIC),
        (stats(0), NO_BASELINE, 60.0, Verdict.NO_TRAFFIC),
        (stats(19), OLD, 60.0, Verdict.NO_TRAFFIC),  # one short of the minimum
        (stats(20), OLD, 60.0, Verdict.PASSED),  # the minimum, and nothing against it
        (stats(19, failed=19), OLD, 60.0, Verdict.NO_TRAFFIC),  # too few to judge errors, too
    ],
)
def test_judge_probation(
    candidate: ServingStats, previous: ServingStats, elapsed_s: float, expected: Verdict
) -> None:
    assert judge_probation(candidate, previous, elapsed_s, POLICY) is expected


@pytest.mark.parametrize(
    ("served", "expected"),
    [(0, Verdict.WATCHING), (19, Verdict.WATCHING), (20, Verdict.PASSED)],
)
def test_a_request_target_below_the_minimum_still_waits_for_the_minimum(
    served: int, expected: Verdict
) -> None:
    policy = ProbationPolicy(requests=0, seconds=60, min_requests=20)
    assert judge_probation(stats(served), OLD, 1.0, policy) is expected


def _with_p99(served: int, bucket: int) -> ServingStats:
    counts = [0] * 16
    counts[bucket] = served
    return ServingStats(served, 0, served * 0.001, tuple(counts))


@pytest.mark.parametrize(
    ("candidate", "previous", "verdict", "state", "latency_ratio", "p99_ratio"),
    [
        (stats(0), OLD, Verdict.WATCHING, "watching", None, None),
        (stats(40, mean_s=0.002), OLD, Verdict.WATCHING, "watching", 2.0, None),
        (_with_p99(40, 5), _with_p99(40, 4), Verdict.PASSED, "passed", 1.0, 2.5),
        (_with_p99(40, 5), NO_BASELINE, Verdict.PASSED, "passed", None, None),
        (stats(40, failed=10), OLD, Verdict.ERRORS, "failed", 1.0, None),
        (stats(100, mean_s=0.01), OLD, Verdict.LATENCY, "failed", 10.0, None),
        (stats(3), OLD, Verdict.NO_TRAFFIC, "passed_without_traffic", None, None),
    ],
)
def test_probation_report(
    *,
    candidate: ServingStats,
    previous: ServingStats,
    verdict: Verdict,
    state: str,
    latency_ratio: float | None,
    p99_ratio: float | None,
) -> None:
    report = probation_report(candidate, previous, verdict, POLICY, UNTIL)
    assert report.state == state
    assert report.requests == candidate.served
    assert report.error_rate == (candidate.failed / candidate.served if candidate.served else 0)
    assert report.latency_ratio == pytest.approx(latency_ratio)
    if p99_ratio is None:
        assert report.p99_ratio is None
    else:  # estimated from histogram buckets
        assert report.p99_ratio == pytest.approx(p99_ratio, rel=0.01)
    assert report.to_json()["until"] == UNTIL.isoformat()


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        (Reason.SIGNATURE_INVALID, ModelState.REJECTED),
        (Reason.URL_REJECTED, ModelState.REJECTED),
        (Reason.EXPIRED, ModelState.REJECTED),
        (Reason.HASH_MISMATCH, ModelState.FAILED),
        (Reason.DISK_FULL, ModelState.FAILED),
        (Reason.MODEL_TOO_DEEP, ModelState.FAILED),
    ],
)
def test_failure_state(reason: Reason, state: ModelState) -> None:
    assert failure_state(reason) is state


F = np.array([[1.0, 2.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("actual", "atol", "problem"),
    [
        ({"y": F}, 0.0, None),
        ({"y": F + 1e-5}, 1e-4, None),
        ({"y": F + 1e-3}, 1e-4, "differs by"),
        ({}, 1.0, "missing"),
        ({"y": F.reshape(2, 1)}, 1.0, "shape"),
        ({"y": np.array([[math.nan, 2.0]], dtype=np.float32)}, 1.0, "NaN or Inf"),
        ({"y": np.array([[b"a", b"b"]], dtype=np.object_)}, 1.0, "differs"),
    ],
)
def test_golden_mismatches(actual: dict[str, np.ndarray], atol: float, problem: str | None) -> None:
    problems = golden_mismatches({"y": F}, actual, atol)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problem in problems[0]

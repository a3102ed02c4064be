"""Feedback joins and windowed accuracy / MAE."""

from __future__ import annotations

import numpy as np
import pytest

from agent.observation.detector import DriftState
from agent.observation.quality import (
    FeedbackOutcome,
    PredictionCache,
    QualityMonitor,
    QualityReference,
    QualitySettings,
    Remembered,
    predicted_rows,
)
from tests.support.clock import FakeClock

PROBS = {"p": np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)}


@pytest.mark.parametrize(
    ("outputs", "rows", "expected"),
    [
        (PROBS, 2, ("classification", [1.0, 0.0])),
        ({"label": np.array([3, 1]), "p": PROBS["p"]}, 2, ("classification", [3.0, 1.0])),
        ({"y": np.array([[2.5], [0.5]])}, 2, ("regression", [2.5, 0.5])),
        ({"y": np.array([2.5])}, 1, ("regression", [2.5])),
        ({"s": np.array([["a"]])}, 1, ("regression", [])),  # nothing to score
    ],
)
def test_predicted_rows(
    outputs: dict[str, np.ndarray], rows: int, expected: tuple[str, list[float]]
) -> None:
    assert predicted_rows(outputs, rows) == expected


def test_feedback_joins_once_whatever_the_order() -> None:
    cache = PredictionCache(10, 60.0, FakeClock())
    for request_id in ("a", "b", "c"):
        cache.remember(request_id, "m", "1", PROBS, 2)
    outcomes = [cache.take(i)[0] for i in ("c", "a", "c", "zzz", "b")]
    assert outcomes == [
        FeedbackOutcome.JOINED,
        FeedbackOutcome.JOINED,
        FeedbackOutcome.DUPLICATE,
        FeedbackOutcome.UNKNOWN,
        FeedbackOutcome.JOINED,
    ]
    assert len(cache) == 0


def test_the_cache_is_bounded_and_forgets_the_oldest() -> None:
    cache = PredictionCache(2, 60.0, FakeClock())
    for request_id in ("a", "b", "c"):
        cache.remember(request_id, "m", "1", PROBS, 2)
    assert len(cache) == 2
    assert cache.take("a")[0] is FeedbackOutcome.UNKNOWN
    assert cache.take("c")[0] is FeedbackOutcome.JOINED


def test_feedback_older_than_the_age_limit_is_late() -> None:
    clock = FakeClock()
    cache = PredictionCache(10, 60.0, clock)
    cache.remember("a", "m", "1", PROBS, 2)
    clock.now = 61.0
    assert cache.take("a") == (FeedbackOutcome.LATE, None)
    assert cache.take("a")[0] is FeedbackOutcome.DUPLICATE


def _remembered(outputs: dict[str, np.ndarray], rows: int) -> Remembered:
    return Remembered("m", "1", outputs, rows, 0.0)


def test_accuracy_per_window_of_labelled_rows() -> None:
    monitor = QualityMonitor(QualitySettings(window_rows=4), None)
    assert monitor.add(_remembered(PROBS, 2), [1, 0]) == []
    (window,) = monitor.add(_remembered(PROBS, 2), [0, 0])
    assert (window.metric, window.rows, window.value) == ("accuracy", 4, 0.75)
    assert np.isnan(window.z)
    assert window.detector.state is DriftState.OK  # no reference: no state change


def test_mae_per_window() -> None:
    monitor = QualityMonitor(QualitySettings(window_rows=2), None)
    (window,) = monitor.add(_remembered({"y": np.array([[2.5], [0.5]])}, 2), [2.0, 1.5])
    assert (window.metric, window.value) == ("mae", 0.75)


def test_accuracy_falling_below_the_reference_goes_to_drift() -> None:
    reference = QualityReference(metric="accuracy", value=0.9, loss_std=0.3)
    monitor = QualityMonitor(QualitySettings(window_rows=20), reference)
    rng = np.random.default_rng(0)
    states = []
    for accuracy in [0.9] * 5 + [0.6] * 5:
        probs = np.eye(2)[rng.integers(0, 2, size=20)]
        truth = probs.argmax(axis=1)
        wrong = rng.random(20) > accuracy
        labels = np.where(wrong, 1 - truth, truth).tolist()
        states += [w.detector.state for w in monitor.add(_remembered({"p": probs}, 20), labels)]
    assert states[:5] == [DriftState.OK] * 5
    assert states[-1] is DriftState.DRIFT


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ({"p": np.tile([[0.1, 0.7, 0.2]], (4, 200))}, ("classification", [1.0] * 4)),
        ({"y": np.arange(4.0).reshape(4, 1).repeat(100, axis=1)[:, :1].copy()}, None),
        ({"y": np.full((400, 1), 2.5)}, ("regression", [2.5] * 400)),
    ],
)
def test_big_outputs_are_kept_as_their_predictions(
    outputs: dict[str, np.ndarray], expected: tuple[str, list[float]] | None
) -> None:
    rows = next(iter(outputs.values())).shape[0]
    cache = PredictionCache(10, 60.0, FakeClock())
    cache.remember("a", "m", "1", outputs, rows)
    _, remembered = cache.take("a")
    assert remembered is not None
    kept = predicted_rows(remembered.outputs, rows)
    assert kept == (expected or predicted_rows(outputs, rows))
    assert sum(a.nbytes for a in remembered.outputs.values()) <= max(1024, 8 * rows)

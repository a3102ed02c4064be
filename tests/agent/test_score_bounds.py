"""Drift and quality scores stay finite and bounded whatever the inputs: +-Inf, NaN and finite
extremes (3e38, 1e308) are counted (missing, out of range, unscored), never propagated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.observation.baseline import MAX_STATISTIC, evidence, score_window
from agent.observation.counts import SUM_LIMIT, FeatureCounts
from agent.observation.detector import MAX_SCORE, Cusum, CusumParams, bounded_scores
from agent.observation.quality import (
    MAX_ROW_LOSS,
    QualityMonitor,
    QualityReference,
    QualitySettings,
    Remembered,
    row_loss,
    window_z,
)
from tests.support.drift_packs import tabular_pack

INF, NAN = float("inf"), float("nan")
EXTREMES = [3e38, -3e38, INF, -INF, NAN, 1e308, -1e308, 5e-324]


def _bounded(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= MAX_SCORE


@pytest.mark.parametrize(
    ("z", "expected"),
    [
        (0.5, 0.5),
        (-2.0, -2.0),
        (INF, MAX_SCORE),
        (-INF, -MAX_SCORE),
        (NAN, MAX_SCORE),  # a statistic arithmetic could not form: the strongest evidence
        (1.13e78, MAX_SCORE),
        (-3e38, -MAX_SCORE),
    ],
)
def test_bounded_scores(z: float, expected: float) -> None:
    assert float(bounded_scores(z)) == expected


@pytest.mark.parametrize("value", EXTREMES)
@pytest.mark.parametrize("rows", [1, 20, 50])
def test_a_window_of_extreme_values_scores_finite_and_bounded(value: float, rows: int) -> None:
    pack = tabular_pack()
    counts = [
        FeatureCounts.of(f.binning, np.full(rows, value), f.min, f.max) for f in pack.features
    ]
    for part in counts:
        assert math.isfinite(part.total)
        assert math.isfinite(part.total_sq)
        # NaN is missing; everything else is present and, past the training range, counted so.
        assert part.missing == (rows if math.isnan(value) else 0)
    scored = score_window(pack, counts)
    if scored.calibrated_rows is None:
        assert math.isnan(scored.score)  # too few rows to score: reported as null, not a number
    else:
        assert _bounded(scored.score), scored.score
    for feature in scored.features:
        for statistic in (feature.divergence, feature.hellinger, feature.psi):
            assert math.isfinite(statistic)
        assert 0.0 <= feature.shift <= MAX_STATISTIC
        assert 0.0 <= feature.spread <= MAX_STATISTIC
        if scored.calibrated_rows is not None:
            assert _bounded(feature.evidence)


def test_extreme_values_still_score_as_drift() -> None:
    pack = tabular_pack()
    counts = [FeatureCounts.of(f.binning, np.full(50, 3e38), f.min, f.max) for f in pack.features]
    assert score_window(pack, counts).score == MAX_SCORE


@pytest.mark.parametrize(
    "statistics",
    [
        [[INF, 0.0, 0.0]],
        [[NAN, NAN, NAN]],
        [[1e308, -1e308, 0.0]],
        [[-INF, -INF, -INF]],
    ],
)
@pytest.mark.parametrize("std", [1.0, 1e-300, 5e-324])
def test_evidence_is_bounded_whatever_the_statistics_and_spreads(
    statistics: list[list[float]], std: float
) -> None:
    result = evidence(np.array(statistics), np.zeros((1, 3)), np.full((1, 3), std))
    assert all(_bounded(v) for v in result.tolist()), result


def test_sums_of_huge_values_stay_finite_and_merge() -> None:
    pack = tabular_pack()
    feature = pack.features[0]
    part = FeatureCounts.of(feature.binning, np.full(10_000, 1e308), feature.min, feature.max)
    assert part.total == 10_000 * SUM_LIMIT
    assert math.isfinite((part + part).total_sq)
    assert part.above == 10_000


@pytest.mark.parametrize(
    ("metric", "predicted", "truth", "loss"),
    [
        ("mae", 1.0, 3.5, 2.5),
        ("mae", 3e38, -3e38, MAX_ROW_LOSS),
        ("mae", 1e308, -1e308, MAX_ROW_LOSS),
        ("mae", INF, 0.0, None),
        ("mae", 0.0, NAN, None),
        ("mae", -INF, -INF, None),
        ("accuracy", 2.0, 2.0, 0.0),
        ("accuracy", 2.0, 1.0, 1.0),
        ("accuracy", 1.0, INF, None),
        ("accuracy", NAN, 1.0, None),
    ],
)
def test_row_loss(metric: str, predicted: float, truth: float, loss: float | None) -> None:
    assert row_loss(metric, predicted, truth) == loss  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("loss", "reference", "std", "rows", "expected"),
    [
        (0.3, 0.1, 0.4, 16, 2.0),
        (MAX_ROW_LOSS, 0.0, 1e-300, 100, MAX_SCORE),
        (0.0, MAX_ROW_LOSS, 5e-324, 100, -MAX_SCORE),
    ],
)
def test_window_z(loss: float, reference: float, std: float, rows: int, expected: float) -> None:
    assert window_z(loss, reference, std, rows) == pytest.approx(expected)


@pytest.mark.parametrize("label", [INF, -INF, NAN, 3e38, 1e308])
def test_quality_windows_of_extreme_labels_are_finite_and_non_finite_ones_counted(
    label: float,
) -> None:
    monitor = QualityMonitor(
        QualitySettings(window_rows=4), QualityReference(metric="mae", value=0.1, loss_std=1e-9)
    )
    outputs = {"value": np.array([[0.5]] * 4)}
    monitor.add(Remembered("m", "1", outputs, 4, 0.0), [1.0, 2.0, 3.0, label])
    monitor.add(Remembered("m", "1", outputs, 4, 0.0), [1.0, 2.0, 3.0, 4.0])
    assert monitor.unscored_rows == (0 if math.isfinite(label) else 1)
    last = monitor.last
    assert last is not None
    assert math.isfinite(last.value)
    assert last.value <= MAX_ROW_LOSS
    assert _bounded(last.z)


@pytest.mark.parametrize("z", [NAN, INF, -INF])
def test_a_non_finite_score_is_counted_and_leaves_the_cusum_as_it_was(z: float) -> None:
    params = CusumParams(h=5.0)
    before = Cusum().step(3.0, params)
    after = before.step(z, params)
    assert (after.level, after.state, after.unscored) == (before.level, before.state, 1)

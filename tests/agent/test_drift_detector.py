"""The CUSUM with hysteresis, and its calibration to a false-alarm rate."""

from __future__ import annotations

import numpy as np
import pytest

from agent.observation.detector import (
    Cusum,
    CusumParams,
    DriftState,
    alarm_rate,
    calibrate_threshold,
)

OK, WARNING, DRIFT = DriftState.OK, DriftState.WARNING, DriftState.DRIFT
PARAMS = CusumParams(h=4.0, k=0.5, clip=3.0)


@pytest.mark.parametrize(
    ("zs", "levels", "states"),
    [
        # noise around the null drains away
        ([0.3, -1.0, 0.4], [0.0, 0.0, 0.0], [OK, OK, OK]),
        # a lasting shift: warning at h/2, drift at h
        ([1.5, 1.5, 1.5, 1.5], [1.0, 2.0, 3.0, 4.0], [OK, WARNING, WARNING, DRIFT]),
        # one odd window adds at most clip - k
        ([100.0], [2.5], [WARNING]),
        # the level is capped at 2h so recovery is bounded
        ([3.0] * 6, [2.5, 5.0, 7.5, 8.0, 8.0, 8.0], [WARNING, DRIFT, DRIFT, DRIFT, DRIFT, DRIFT]),
        # hysteresis: drift holds until below h/2, warning holds until below h/4
        (
            [3.0, 3.0, -1.0, -0.5, -0.5, -0.5, -0.5],
            [2.5, 5.0, 3.5, 2.5, 1.5, 0.5, 0.0],
            [WARNING, DRIFT, DRIFT, DRIFT, WARNING, OK, OK],
        ),
        # a window with nothing to score leaves the evidence as it was
        ([2.5, float("nan"), 2.5], [2.0, 2.0, 4.0], [WARNING, WARNING, DRIFT]),
    ],
)
def test_cusum_steps(zs: list[float], levels: list[float], states: list[DriftState]) -> None:
    detector, seen = Cusum(), []
    for z in zs:
        detector = detector.step(z, PARAMS)
        seen.append((detector.level, detector.state))
    assert seen == list(zip(levels, states, strict=True))


@pytest.mark.parametrize(("h", "k", "clip"), [(0.0, 0.5, 3.0), (1.0, -0.1, 3.0), (1.0, 0.5, 0.0)])
def test_params_refuse_nonsense(h: float, k: float, clip: float) -> None:
    with pytest.raises(ValueError, match="need h > 0"):
        CusumParams(h, k, clip)


@pytest.mark.parametrize(
    ("zs", "h", "rate"),
    [
        ([0.0] * 10, 1.0, 0.0),
        ([2.5] * 10, 4.0, 0.5),  # two windows per alarm, then a restart
        ([5.0] * 10, 1.0, 1.0),
    ],
)
def test_alarm_rate(zs: list[float], h: float, rate: float) -> None:
    assert alarm_rate(np.array(zs), CusumParams(h, 0.5, 3.0)) == rate


@pytest.mark.parametrize("target", [1e-2, 1e-3])
def test_calibrated_threshold_meets_the_target_on_fresh_null_scores(target: float) -> None:
    rng = np.random.default_rng(7)
    params = calibrate_threshold(rng.standard_normal(2000), target, rng, windows=50_000)
    fresh = alarm_rate(np.random.default_rng(8).standard_normal(200_000), params)
    assert fresh <= target * 1.5
    # and it is the smallest such threshold, not a huge safe one
    assert (
        alarm_rate(
            np.random.default_rng(8).standard_normal(200_000),
            CusumParams(params.h * 0.7, params.k, params.clip),
        )
        > target
    )


def test_calibration_needs_enough_scores() -> None:
    with pytest.raises(ValueError, match="at least 10 null scores"):
        calibrate_threshold(np.zeros(3), 1e-3, np.random.default_rng(0))

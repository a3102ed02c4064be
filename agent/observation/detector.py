"""A one-sided CUSUM over standardised window scores, with hysteresis between states (pure).

Each window yields a score ``z`` already standardised against what windows of training data
score (mean 0, spread 1 under no drift). The CUSUM adds ``clip(z) - k`` and never goes below
zero, so a lasting small shift accumulates while isolated noisy windows drain away; clipping
bounds what one odd window can add, and the cap bounds how long recovery takes after a drift
ends. States enter at a higher level than they leave, so a score hovering at a threshold does
not flap.

    ok --(c >= h/2)--> warning --(c >= h)--> drift
    drift --(c < h/2)--> warning --(c < h/4)--> ok
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_SCORE",
    "Cusum",
    "CusumParams",
    "DriftState",
    "alarm_rate",
    "bounded_scores",
    "calibrate_threshold",
]

# Scores are in standard deviations; past this they say nothing more (the CUSUM clips what
# one window adds at a few), and the bound keeps any input, however extreme, from reaching
# the twin or a gauge as 1e78.
MAX_SCORE = 1000.0


def bounded_scores(z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Scores clipped to +-MAX_SCORE. NaN (a statistic the arithmetic could not form, which
    only values far past any training range cause) counts as the strongest evidence."""
    array = np.asarray(z, dtype=np.float64)
    return np.clip(np.nan_to_num(array, nan=MAX_SCORE), -MAX_SCORE, MAX_SCORE)


class DriftState(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    DRIFT = "drift"


@dataclass(frozen=True)
class CusumParams:
    """``h``: the alarm level; ``k``: the allowance subtracted per window; ``clip``: the largest
    standardised score one window may contribute."""

    h: float
    k: float = 0.5
    clip: float = 4.0

    def __post_init__(self) -> None:
        if not (self.h > 0 and self.k >= 0 and self.clip > 0):
            raise ValueError(f"need h > 0, k >= 0, clip > 0: got {self}")

    @property
    def cap(self) -> float:
        return 2.0 * self.h


@dataclass(frozen=True)
class Cusum:
    """The detector's whole state; :meth:`step` returns the next one."""

    level: float = 0.0
    state: DriftState = DriftState.OK
    unscored: int = 0  # windows whose score was NaN or Inf: counted, never accumulated

    def step(self, z: float, params: CusumParams) -> Cusum:
        if not np.isfinite(z):
            # A window with nothing to score leaves the evidence as it was.
            return Cusum(self.level, self.state, self.unscored + 1)
        increment = min(params.clip, max(-params.clip, z)) - params.k
        level = min(params.cap, max(0.0, self.level + increment))
        return Cusum(level, _next_state(self.state, level, params.h), self.unscored)


def _next_state(state: DriftState, level: float, h: float) -> DriftState:
    if level >= h:
        return DriftState.DRIFT
    if state is DriftState.DRIFT:
        return DriftState.DRIFT if level >= h / 2 else DriftState.WARNING
    if state is DriftState.WARNING:
        return DriftState.WARNING if level >= h / 4 else DriftState.OK
    return DriftState.WARNING if level >= h / 2 else DriftState.OK


def alarm_rate(z: npt.NDArray[np.float64], params: CusumParams) -> float:
    """Alarms per window when the CUSUM runs over ``z`` and restarts after each alarm."""
    clipped = np.clip(z, -params.clip, params.clip) - params.k
    level, alarms = 0.0, 0
    for increment in clipped.tolist():
        level = max(0.0, level + increment)
        if level >= params.h:
            alarms += 1
            level = 0.0
    return alarms / max(1, z.size)


def calibrate_threshold(
    null_z: npt.NDArray[np.float64],
    target_rate: float,
    rng: np.random.Generator,
    *,
    k: float = 0.5,
    clip: float = 4.0,
    windows: int = 100_000,
) -> CusumParams:
    """The smallest ``h`` whose alarm rate per window stays at or below ``target_rate`` when
    the CUSUM runs over ``windows`` scores resampled from ``null_z`` (windows of training data).

    Bisection: the alarm rate falls as ``h`` grows.
    """
    if null_z.size < 10:
        raise ValueError(f"need at least 10 null scores to calibrate, got {null_z.size}")
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be in (0, 1), got {target_rate}")
    stream = rng.choice(null_z, size=windows, replace=True)
    low, high = 1e-3, 2.0 * clip
    while alarm_rate(stream, CusumParams(high, k, clip)) > target_rate:
        high *= 2
        if high > 1e4:
            raise ValueError("no threshold reaches the target rate: scores are not standardised")
    for _ in range(20):
        middle = (low + high) / 2
        if alarm_rate(stream, CusumParams(middle, k, clip)) > target_rate:
            low = middle
        else:
            high = middle
    return CusumParams(round(high, 4), k, clip)

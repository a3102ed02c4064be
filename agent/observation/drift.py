"""Drift of a served release's inputs and outputs, on the device.

The hot path pays one counter decrement per request; one request in ``k`` (``k`` grows with
the request rate so that at most ``max_sampled_per_second`` are sampled) has its feature values
copied into a preallocated ring buffer. Windows (``window_rows`` rows, or what arrived within
``window_seconds``) are closed off the hot path by :meth:`DriftMonitor.close_windows`, which
counts them into a mergeable profile, scores them against the release's baseline and steps the
CUSUM. A monitor belongs to one release: windows never mix releases.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.observation.baseline import (
    BaselinePack,
    Extractor,
    Feature,
    WindowScore,
    score_window,
)
from agent.observation.counts import FeatureCounts
from agent.observation.detector import Cusum, CusumParams, DriftState
from wire.desired import DriftSettings
from wire.states import DriftState as ReportedDrift
from wire.telemetry import PROFILE_SCHEMA, DriftProfile, to_message

__all__ = [
    "PROFILE_SCHEMA",
    "DriftMonitor",
    "DriftSettings",
    "WindowResult",
    "profile_message",
]


Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class WindowResult:
    """One closed window: its profile (counts), its score, and the detector after it."""

    seq: int
    started: float  # monotonic seconds
    ended: float
    counts: tuple[FeatureCounts, ...]
    score: WindowScore
    detector: Cusum
    previous: DriftState

    @property
    def changed(self) -> bool:
        return self.detector.state is not self.previous


class DriftMonitor:
    """Samples one release's requests and scores its windows; not thread-safe (loop only)."""

    def __init__(
        self,
        pack: BaselinePack,
        settings: DriftSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        wanted = set(settings.features) if settings.features is not None else None
        self.pack = pack
        self._columns = [
            i for i, f in enumerate(pack.features) if wanted is None or f.name in wanted
        ]
        self.features = tuple(pack.features[i] for i in self._columns)
        self.settings = settings
        self.calibration = pack.nearest_window(settings.window_rows)
        self.window_rows = self.calibration.rows  # only calibrated sizes are used
        base = self.calibration.cusum
        self.cusum = CusumParams(settings.threshold or base.h, base.k, base.clip)
        self._clock = clock
        self._extractor = Extractor([f.source for f in self.features])
        self._capacity = 2 * self.window_rows
        self._ring = np.full((self._capacity, len(self.features)), np.nan)
        self._scratch = np.empty((1, len(self.features)))
        self._spread: dict[int, npt.NDArray[np.int64]] = {}
        self._written = 0  # rows ever written; the ring index is this modulo capacity
        self._read = 0
        self._every = settings.sample_every
        self._countdown = 1
        self._rate_since = clock()
        self._rate_seen = 0
        self.detector = Cusum()
        self.seq = 0
        self.window_started = clock()
        self.requests_sampled = 0
        self.rows_dropped = 0

    # --- hot path -------------------------------------------------------------------------

    def observe(
        self,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]],
        rows: int,
    ) -> None:
        """Offer one request (all its rows) and its response; most calls return at once."""
        self._countdown -= 1
        if self._countdown > 0:
            return
        self._countdown = self._every
        self._sample(inputs, outputs, rows)

    def _sample(
        self,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]],
        rows: int,
    ) -> None:
        self.requests_sampled += 1
        if rows <= 0:
            return
        scratch = self._scratch if rows == 1 else np.empty((rows, len(self.features)))
        self._extractor.into(scratch, {**inputs, **outputs}, rows)
        keep = min(self.settings.max_rows_per_request, self._capacity)
        if rows > keep:
            spread = self._spread.get(rows)
            if spread is None:  # evenly spaced rows, computed once per batch size
                spread = self._spread[rows] = np.linspace(0, rows - 1, keep).astype(np.int64)
                if len(self._spread) > 64:
                    self._spread.clear()
            scratch = scratch[spread]
            rows = keep
        start = self._written % self._capacity
        end = start + rows
        if end <= self._capacity:
            self._ring[start:end] = scratch
        else:
            split = self._capacity - start
            self._ring[start:] = scratch[:split]
            self._ring[: end - self._capacity] = scratch[split:]
        self._written += rows
        overrun = self._written - self._read - self._capacity
        if overrun > 0:  # the closer fell behind: the oldest rows are gone
            self.rows_dropped += overrun
            self._read += overrun

    # --- off the hot path -------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        return self._written - self._read

    def adapt_sampling(self, requests_seen: int) -> int:
        """Retune k from the requests seen since the last call; returns the new k."""
        now = self._clock()
        elapsed = now - self._rate_since
        if elapsed > 0:
            rate = (requests_seen - self._rate_seen) / elapsed
            k = math.ceil(rate / self.settings.max_sampled_per_second)
            self._every = max(self.settings.sample_every, k)
            self._countdown = min(self._countdown, self._every)
        self._rate_since, self._rate_seen = now, requests_seen
        return self._every

    @property
    def sample_every(self) -> int:
        return self._every

    def close_windows(self) -> list[WindowResult]:
        """Close every full window, and a partial one older than ``window_seconds``."""
        results = []
        while self.pending_rows >= self.window_rows:
            results.append(self._close(self.window_rows))
        now = self._clock()
        if self.pending_rows and now - self.window_started >= self.settings.window_seconds:
            results.append(self._close(self.pending_rows))
        elif not self.pending_rows and now - self.window_started >= self.settings.window_seconds:
            self.window_started = now  # an idle window is no window
        return results

    def _close(self, rows: int) -> WindowResult:
        start = self._read % self._capacity
        index = (np.arange(rows) + start) % self._capacity
        block = self._ring[index]
        self._read += rows
        counts = tuple(
            FeatureCounts.of(f.binning, block[:, i], f.min, f.max)
            for i, f in enumerate(self.features)
        )
        score = score_window(self._subpack(), counts)
        previous = self.detector.state
        # A partial window scores against the calibration of its own size; the CUSUM keeps the
        # configured window's threshold.
        self.detector = self.detector.step(score.score, self.cusum)
        self.seq += 1
        now = self._clock()
        result = WindowResult(
            self.seq, self.window_started, now, counts, score, self.detector, previous
        )
        self.window_started = now
        return result

    def _subpack(self) -> BaselinePack:
        if len(self.features) == len(self.pack.features):
            return self.pack
        cached: BaselinePack | None = getattr(self, "_cached_subpack", None)
        if cached is None:
            cached = _restrict(self.pack, self._columns)
            self._cached_subpack = cached
        return cached


_PER_FEATURE = (
    "divergence_mean",
    "divergence_std",
    "shift_mean",
    "shift_std",
    "spread_mean",
    "spread_std",
)


def _restrict(pack: BaselinePack, columns: Sequence[int]) -> BaselinePack:
    """The pack cut down to some features (the calibration's per-feature nulls follow);
    validated afresh rather than copied, since a copy would keep the cached arrays."""
    document = pack.model_dump(by_alias=True)
    document["features"] = [document["features"][i] for i in columns]
    for window in document["calibration"]["windows"]:
        for name in _PER_FEATURE:
            window[name] = [window[name][i] for i in columns]
    return BaselinePack.model_validate(document, strict=False)


def _sparse(counts: FeatureCounts) -> dict[str, Any]:
    nonzero = np.flatnonzero(counts.counts)
    return {
        "bins": counts.counts.size,
        "i": nonzero.tolist(),
        "c": counts.counts[nonzero].tolist(),
        "sum": counts.total,
        "sum_sq": counts.total_sq,
        "below": counts.below,
        "above": counts.above,
    }


def profile_message(
    result: WindowResult,
    *,
    model: str,
    version: int,
    baseline_sha256: str,
    features: Sequence[Feature],
    max_features: int,
    wall_clock: float,
    max_bytes: int = 4000,
) -> dict[str, Any]:
    """A window as an immutable telemetry profile: sparse counts of at most ``max_features``
    features, the most divergent first while the JSON stays under ``max_bytes``; mergeable by
    adding counts of the same baseline. ``truncated`` counts the features left out."""
    order = sorted(
        range(len(features)),
        key=lambda i: -np.nan_to_num(result.score.features[i].evidence, nan=-np.inf),
    )
    sparse = {i: _sparse(result.counts[i]) for i in order[:max_features]}
    budget = max_bytes - 400  # the envelope below, with room to spare
    kept = []
    for i in order[:max_features]:
        cost = len(json.dumps({features[i].name: sparse[i]}, separators=(",", ":")))
        if cost > budget:
            break
        budget -= cost
        kept.append(i)
    kept.sort()
    profile = DriftProfile(
        model=model,
        version=version,
        baseline=baseline_sha256,
        seq=result.seq,
        ended=round(wall_clock, 3),
        seconds=round(result.ended - result.started, 3),
        rows=result.score.rows,
        score=rounded(result.score.score),
        state=ReportedDrift(result.detector.state.value),
        features={features[i].name: sparse[i] for i in kept},
        truncated=len(features) - len(kept),
    )
    return to_message(profile)


def rounded(value: float) -> float | None:
    """A score for JSON: four decimals, or None where it is not finite."""
    return round(value, 4) if math.isfinite(value) else None

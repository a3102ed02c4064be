"""The drift baseline pack: what training data looked like, and how to score a window against it.

Made on the cloud side (``python -m deployment baseline``) and shipped beside the model; the
device parses it strictly (it is a verified artifact, but still a boundary) and scores each
window's counts with :func:`score_window`. The same functions score the windows that calibrate
the thresholds, so the cloud and the device cannot disagree on what a score means.

Per feature the pack holds the bin cuts and reference probabilities (layout in
:mod:`agent.observation.counts`), the moments and range of the training values, and where the
feature comes from in a request (``source``). ``calibration`` gives, per window size, the null
mean and spread of each feature's statistics (divergence, mean shift, variance change) and of the
aggregate score,
and the CUSUM threshold that keeps false alarms at the target rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import (
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from agent.observation.counts import Binning, FeatureCounts
from agent.observation.detector import CusumParams, bounded_scores
from agent.observation.divergence import PSI_FLOOR
from agent.observation.quality import QualityReference
from wire.base import WireModel
from wire.bounded_json import BoundedJsonError, JsonLimits, check_bounds

# The download cap, part of the manifest's shape: far above a pack of 64 features x 32 bins x
# 5 window sizes (~100 KB).
from wire.manifest import MAX_BASELINE_BYTES

__all__ = [
    "BASELINE_SCHEMA",
    "MAX_BASELINE_BYTES",
    "BaselineInvalidError",
    "BaselinePack",
    "Calibration",
    "Extractor",
    "Feature",
    "FeatureScore",
    "Source",
    "WindowCalibration",
    "WindowScore",
    "aggregate",
    "evidence",
    "parse_baseline",
    "score_window",
]

BASELINE_SCHEMA = "agent-drift-baseline/1"
# A pack nests a handful of levels (features, their bins, calibration windows).
BASELINE_LIMITS = JsonLimits(max_bytes=MAX_BASELINE_BYTES, max_depth=16)
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Spread = Annotated[float, Field(gt=0, allow_inf_nan=False)]

Floats = npt.NDArray[np.float64]


class BaselineInvalidError(ValueError):
    """The baseline pack is not one this agent can use; the message says what is wrong."""


class Source(WireModel):
    """Where a feature comes from in a request or its response, per row of the batch.

    ``position``: element ``index`` of the row flattened; ``channel_mean``: mean of channel
    ``index`` (axis 1) of an image-like row; ``row_max``: the row's largest value (top-class
    confidence); ``row_argmax``: the position of that value (the predicted class).
    """

    tensor: Name
    role: Literal["input", "output"]
    reduce: Literal["position", "channel_mean", "row_max", "row_argmax"]
    index: int = Field(ge=0, le=2**31)


class Feature(WireModel):
    name: Name
    source: Source
    kind: Literal["numeric", "categorical"]
    cuts: tuple[Finite, ...] = Field(max_length=256)
    reference: tuple[Annotated[float, Field(ge=0, le=1)], ...]
    mean: Finite
    std: Spread
    min: Finite
    max: Finite
    missing_rate: Annotated[float, Field(ge=0, le=1)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.reference) != len(self.cuts) + 2:
            raise ValueError(
                f"feature {self.name}: {len(self.reference)} reference probabilities for "
                f"{len(self.cuts) + 2} bins"
            )
        if not math.isclose(sum(self.reference), 1.0, abs_tol=1e-6):
            raise ValueError(f"feature {self.name}: reference probabilities do not sum to 1")
        if any(b <= a for a, b in zip(self.cuts, self.cuts[1:], strict=False)):
            raise ValueError(f"feature {self.name}: cuts are not strictly increasing")
        if self.kind == "categorical" and not self.cuts:
            raise ValueError(f"feature {self.name}: a categorical feature needs categories")
        if self.min > self.max:
            raise ValueError(f"feature {self.name}: min is above max")
        return self

    @cached_property
    def binning(self) -> Binning:
        return Binning(self.kind, np.asarray(self.cuts, dtype=np.float64))

    @cached_property
    def reference_array(self) -> Floats:
        return np.asarray(self.reference, dtype=np.float64)


class WindowCalibration(WireModel):
    """What windows of ``rows`` training rows score (null mean and spread), and the threshold."""

    rows: int = Field(ge=2, le=1_000_000)
    divergence_mean: tuple[Finite, ...]
    divergence_std: tuple[Spread, ...]
    shift_mean: tuple[Finite, ...]
    shift_std: tuple[Spread, ...]
    spread_mean: tuple[Finite, ...]
    spread_std: tuple[Spread, ...]
    score_mean: Finite
    score_std: Spread
    h: Spread
    k: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    clip: Spread

    @property
    def cusum(self) -> CusumParams:
        return CusumParams(self.h, self.k, self.clip)

    @cached_property
    def null_means(self) -> Floats:
        return np.stack([self.divergence_mean, self.shift_mean, self.spread_mean], axis=1)

    @cached_property
    def null_stds(self) -> Floats:
        return np.stack([self.divergence_std, self.shift_std, self.spread_std], axis=1)


class Calibration(WireModel):
    false_alarms_per_10k: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    resamples: int = Field(ge=10)
    windows: tuple[WindowCalibration, ...] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _sorted(self) -> Self:
        sizes = [w.rows for w in self.windows]
        if sizes != sorted(set(sizes)):
            raise ValueError("calibrated window sizes must be strictly increasing")
        return self


class Skipped(WireModel):
    tensor: Name
    reason: Literal["bytes", "constant", "feature_cap", "unsupported_shape"]


class BaselinePack(WireModel):
    schema_: Literal["agent-drift-baseline/1"] = Field(alias="schema")
    rows: int = Field(ge=1)
    features: tuple[Feature, ...] = Field(min_length=1, max_length=256)
    skipped: tuple[Skipped, ...] = ()
    calibration: Calibration
    quality: QualityReference | None = None  # when the training labels were given

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        names = [f.name for f in self.features]
        if len(names) != len(set(names)):
            raise ValueError("feature names must be unique")
        count = len(self.features)
        for window in self.calibration.windows:
            lengths = {
                len(window.divergence_mean),
                len(window.divergence_std),
                len(window.shift_mean),
                len(window.shift_std),
                len(window.spread_mean),
                len(window.spread_std),
            }
            if lengths != {count}:
                raise ValueError(
                    f"calibration for {window.rows} rows does not cover the {count} features"
                )
        return self

    @cached_property
    def reference_matrix(self) -> Floats:
        """Reference probabilities of every feature, zero-padded to the widest."""
        width = max(f.binning.size for f in self.features)
        return _padded([f.reference_array for f in self.features], width)

    @cached_property
    def moments(self) -> tuple[Floats, Floats]:
        return (
            np.array([f.mean for f in self.features]),
            np.array([f.std for f in self.features]),
        )

    def window_for(self, rows: int) -> WindowCalibration | None:
        """The largest calibrated window not larger than ``rows`` (None: too few rows)."""
        fitting = [w for w in self.calibration.windows if w.rows <= rows]
        return fitting[-1] if fitting else None

    def nearest_window(self, rows: int) -> WindowCalibration:
        """The calibrated window size nearest to a requested one (ties go to the larger)."""
        return min(self.calibration.windows, key=lambda w: (abs(w.rows - rows), -w.rows))


def parse_baseline(data: bytes) -> BaselinePack:
    """Parse and check a baseline pack; raises :class:`BaselineInvalidError` naming the problem."""
    try:
        data = check_bounds(data, BASELINE_LIMITS)
    except BoundedJsonError as e:
        raise BaselineInvalidError(f"baseline is {e.problem}: {e.message}") from None
    try:
        return BaselinePack.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise BaselineInvalidError(
            f"baseline {where}: {first['msg']} ({e.error_count()} error(s))"
        ) from None


# --- from request tensors to feature rows ----------------------------------------------------


class Extractor:
    """Feature values of a request (or its response), per row: the ``rows x len(sources)``
    matrix. Compiled per (tensor, reduction), so that a request costs a handful of numpy calls
    whatever the number of features.

    A tensor the request lacks, or an index past its row, gives NaN (counted as missing), so a
    malformed request can skew a window but never break the monitor.
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        groups: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        for column, source in enumerate(sources):
            columns, indices = groups.setdefault((source.tensor, source.reduce), ([], []))
            columns.append(column)
            indices.append(source.index)
        self.width = len(sources)
        self._groups = [
            (tensor, reduce, np.array(columns), np.array(indices), max(indices))
            for (tensor, reduce), (columns, indices) in groups.items()
        ]

    def __call__(self, tensors: Mapping[str, npt.NDArray[Any]], rows: int) -> Floats:
        out = np.empty((rows, self.width))
        self.into(out, tensors, rows)
        return out

    def into(self, out: Floats, tensors: Mapping[str, npt.NDArray[Any]], rows: int) -> None:
        out[:] = np.nan
        for tensor_name, reduce, columns, indices, largest in self._groups:
            tensor = tensors.get(tensor_name)
            if tensor is None or tensor.shape[:1] != (rows,) or tensor.dtype.kind not in "biuf":
                continue
            flat = tensor.reshape(rows, -1)
            if reduce == "position":
                if largest < flat.shape[1]:
                    out[:, columns] = flat[:, indices]
            elif reduce == "channel_mean":
                if tensor.ndim >= 3 and largest < tensor.shape[1]:
                    channels = tensor.reshape(rows, tensor.shape[1], -1)[:, indices]
                    out[:, columns] = channels.mean(axis=2)
            elif flat.shape[1]:
                reduced = flat.argmax(axis=1) if reduce == "row_argmax" else flat.max(axis=1)
                out[:, columns] = reduced[:, None]


# --- scoring a window --------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureScore:
    name: str
    divergence: float  # Jensen-Shannon, bits
    hellinger: float
    psi: float
    shift: float  # |window mean - training mean| in standard errors
    spread: float  # |window variance / training variance - 1| in standard errors
    evidence: float  # the larger standardised statistic of the two, against the null


@dataclass(frozen=True)
class WindowScore:
    rows: int
    calibrated_rows: int | None  # None: fewer rows than the smallest calibrated window
    features: tuple[FeatureScore, ...]
    score: float  # standardised aggregate; NaN when not calibrated

    @property
    def top(self) -> FeatureScore | None:
        return max(self.features, key=lambda f: f.evidence, default=None)


def evidence(statistics: Floats, means: Floats, stds: Floats) -> Floats:
    """Per-feature evidence: the largest of a feature's statistics, each standardised against
    its null mean and spread. ``statistics``: ``[windows x] features x 3``; ``means`` and
    ``stds``: ``features x 3``."""
    with np.errstate(
        over="ignore", invalid="ignore", divide="ignore"
    ):  # a tiny null spread can overflow
        raw = ((statistics - means) / stds).max(axis=-1)
    return bounded_scores(raw)


def aggregate(statistics: Floats, window: WindowCalibration) -> tuple[Floats, Floats]:
    """Per-feature evidence and the standardised aggregate score (the largest evidence)."""
    per_feature = evidence(statistics, window.null_means, window.null_stds)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        score = (per_feature.max(axis=-1) - window.score_mean) / window.score_std
    return per_feature, bounded_scores(score)


def _padded(rows: Sequence[npt.NDArray[Any]], width: int) -> Floats:
    out = np.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : row.size] = row
    return out


def _statistics(
    pack: BaselinePack, counts: Sequence[FeatureCounts]
) -> tuple[Floats, Floats, Floats]:
    """(features x 3 statistics, Hellinger, PSI) of every feature at once: one window costs a
    few array operations instead of a dozen small ones per feature (it runs on the loop)."""
    reference = pack.reference_matrix
    current = _padded([c.counts for c in counts], reference.shape[1])
    totals = current.sum(axis=1, keepdims=True)
    q = current / np.maximum(totals, 1)
    p = reference
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=1)
    divergence = np.clip((kl_p + kl_q) / 2, 0.0, 1.0)
    hellinger_ = np.sqrt(np.maximum(0.0, 1.0 - np.sqrt(p * q).sum(axis=1)))
    pf, qf = np.maximum(p, PSI_FLOOR), np.maximum(q, PSI_FLOOR)
    psi_ = ((qf - pf) * np.log(qf / pf)).sum(axis=1)
    present = np.array([c.present for c in counts], dtype=np.float64)
    total = np.array([c.total for c in counts])
    total_sq = np.array([c.total_sq for c in counts])
    mean, std = pack.moments
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        window_mean = total / present
        window_var = np.maximum(0.0, total_sq / present - window_mean**2)
        shift = np.abs(window_mean - mean) / (std / np.sqrt(present))
        spread = np.abs(window_var / std**2 - 1.0) * np.sqrt(present / 2)
    empty = present == 0
    shift[empty] = spread[empty] = 0.0
    # Inf or NaN here (huge values against a tiny training spread) is as far from training
    # as data gets: the largest statistic, which `evidence` then bounds in null spreads.
    shift = _capped(shift)
    spread = _capped(spread)
    return np.stack([divergence, shift, spread], axis=1), hellinger_, psi_


# Shift and spread are in standard errors; no real window comes near this, and a finite
# statistic keeps its standardisation (`evidence`) finite.
MAX_STATISTIC = 1e12


def _capped(statistic: Floats) -> Floats:
    return np.clip(
        np.nan_to_num(statistic, nan=MAX_STATISTIC, posinf=MAX_STATISTIC), 0.0, MAX_STATISTIC
    )


def score_window(pack: BaselinePack, counts: Sequence[FeatureCounts]) -> WindowScore:
    if len(counts) != len(pack.features):
        raise ValueError(f"{len(counts)} feature counts for {len(pack.features)} features")
    for feature, part in zip(pack.features, counts, strict=True):
        if part.counts.size != feature.binning.size:
            raise ValueError(
                f"feature {feature.name}: {part.counts.size} counts for {feature.binning.size} bins"
            )
    rows = max((c.rows for c in counts), default=0)
    stats, hellingers, psis = _statistics(pack, counts)
    window = pack.window_for(rows)
    if window is None:
        evidence, score = np.full(len(counts), np.nan), float("nan")
    else:
        evidence, aggregated = aggregate(stats, window)
        score = float(aggregated)
    return WindowScore(
        rows=rows,
        calibrated_rows=None if window is None else window.rows,
        features=tuple(
            FeatureScore(
                name=f.name,
                divergence=float(stats[i, 0]),
                hellinger=float(hellingers[i]),
                psi=float(psis[i]),
                shift=float(stats[i, 1]),
                spread=float(stats[i, 2]),
                evidence=float(evidence[i]),
            )
            for i, f in enumerate(pack.features)
        ),
        score=score,
    )

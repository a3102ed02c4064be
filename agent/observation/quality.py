"""Model value from ground truth: join feedback labels with recent predictions, per window.

A prediction is remembered (bounded, oldest evicted) under its correlation id with the
outputs as served; feedback ``{id, label}`` pops it and scores it. Feedback for an id never
seen, already scored, or forgotten (evicted or older than ``max_age_s``) is counted by
outcome, never an error: labels arrive late, twice, or for another device's predictions.
Windows of ``window_rows`` labelled rows give accuracy (classification) or mean absolute error
(regression); a release whose baseline carries a reference value gets the same CUSUM states as
drift, on the standardised loss of each window.
"""

from __future__ import annotations

import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.observation.detector import Cusum, CusumParams, DriftState, bounded_scores
from wire.base import WireModel

__all__ = [
    "FeedbackOutcome",
    "PredictionCache",
    "QualityMonitor",
    "QualityReference",
    "QualitySettings",
    "QualityWindow",
    "Remembered",
    "predicted_rows",
]

Label = float | int | bool


class FeedbackOutcome(enum.StrEnum):
    JOINED = "joined"
    UNKNOWN = "unknown"  # never predicted here (or long forgotten)
    DUPLICATE = "duplicate"  # already scored
    LATE = "late"  # remembered, but older than max_age_s
    MISMATCHED = "mismatched"  # label count differs from the prediction's rows


class QualitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    window_rows: int = Field(100, ge=1, le=100_000)
    remembered: int = Field(10_000, ge=1, le=1_000_000)
    max_age_s: float = Field(3600.0, gt=0, le=7 * 86_400)
    h: float = Field(5.0, gt=0, le=1000)  # CUSUM threshold on standardised window loss
    k: float = Field(0.5, ge=0, le=100)


class QualityReference(WireModel):
    """What the model achieved on held-out data: accuracy or MAE, and the spread of the
    per-row loss (0/1 error or absolute error) that standardises a window's loss."""

    metric: Literal["accuracy", "mae"]
    value: float = Field(ge=0, allow_inf_nan=False)
    loss_std: float = Field(gt=0, allow_inf_nan=False)


@dataclass(frozen=True, slots=True)
class Remembered:
    model: str
    version: str
    outputs: Mapping[str, npt.NDArray[Any]]
    rows: int
    at: float


def predicted_rows(outputs: Mapping[str, npt.NDArray[Any]], rows: int) -> tuple[str, list[float]]:
    """("classification" | "regression", one prediction per row) from a model's outputs.

    An integer or boolean output is a label; a float output with several values per row is
    class scores (argmax); a float output with one value per row is a regression value.
    The first output decides, as the contract lists them.
    """
    for array in outputs.values():
        if array.shape[:1] != (rows,) or array.dtype.kind not in "biuf":
            continue
        flat = array.reshape(rows, -1)
        if flat.shape[1] == 0:
            continue
        if array.dtype.kind in "biu":
            return "classification", flat[:, 0].astype(np.float64).tolist()
        if flat.shape[1] > 1:
            return "classification", flat.argmax(axis=1).astype(np.float64).tolist()
        return "regression", flat[:, 0].astype(np.float64).tolist()
    return "regression", []


# The largest absolute error one row adds to a window: far beyond any target a model serves,
# it keeps a window's mean finite whatever a prediction or a label holds.
MAX_ROW_LOSS = 1e12


def row_loss(metric: Literal["accuracy", "mae"], predicted: float, truth: float) -> float | None:
    """One labelled row's loss (0/1 error, or absolute error capped at MAX_ROW_LOSS); None
    when either side is NaN or Inf, which has no loss to count."""
    if not (math.isfinite(predicted) and math.isfinite(truth)):
        return None
    if metric == "accuracy":
        return 0.0 if predicted == truth else 1.0
    return min(abs(predicted - truth), MAX_ROW_LOSS)


# Outputs kept as served up to this size per prediction (a few dozen floats per row).
MAX_KEPT_OUTPUT_BYTES = 1024


def _as_outputs(kind: str, predicted: list[float]) -> dict[str, npt.NDArray[Any]]:
    """Predictions in the shape `predicted_rows` reads back as the same predictions."""
    values = np.asarray(predicted)
    if kind == "classification":
        return {"label": values.astype(np.int64)}
    return {"value": values.reshape(-1, 1)}


class PredictionCache:
    """Recent predictions by correlation id: bounded, oldest first out."""

    def __init__(
        self, capacity: int, max_age_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._capacity = capacity
        self._max_age_s = max_age_s
        self._clock = clock
        self._items: OrderedDict[str, Remembered] = OrderedDict()
        self._scored: OrderedDict[str, None] = OrderedDict()  # to tell duplicates from unknown

    def __len__(self) -> int:
        return len(self._items)

    def remember(
        self,
        request_id: str,
        model: str,
        version: str,
        outputs: Mapping[str, npt.NDArray[Any]],
        rows: int,
    ) -> None:
        items = self._items
        if sum(a.nbytes for a in outputs.values()) > MAX_KEPT_OUTPUT_BYTES:
            # Big outputs (images, embeddings) are not kept by the thousand: their predictions
            # are taken now, a cost only such models pay.
            kind, predicted = predicted_rows(outputs, rows)
            outputs = _as_outputs(kind, predicted)
        items[request_id] = Remembered(model, version, outputs, rows, self._clock())
        items.move_to_end(request_id)
        if len(items) > self._capacity:
            items.popitem(last=False)

    def take(self, request_id: str) -> tuple[FeedbackOutcome, Remembered | None]:
        item = self._items.pop(request_id, None)
        if item is None:
            seen = request_id in self._scored
            return (FeedbackOutcome.DUPLICATE if seen else FeedbackOutcome.UNKNOWN), None
        self._scored[request_id] = None
        if len(self._scored) > self._capacity:
            self._scored.popitem(last=False)
        if self._clock() - item.at > self._max_age_s:
            return FeedbackOutcome.LATE, None
        return FeedbackOutcome.JOINED, item


@dataclass(frozen=True)
class QualityWindow:
    seq: int
    metric: Literal["accuracy", "mae"]
    rows: int
    value: float  # accuracy in [0, 1], or mean absolute error
    z: float  # standardised loss against the reference; NaN without one
    detector: Cusum
    previous: DriftState

    @property
    def changed(self) -> bool:
        return self.detector.state is not self.previous


def window_z(loss: float, reference_loss: float, loss_std: float, rows: int) -> float:
    """A window's mean loss standardised against the reference, bounded (`MAX_SCORE`)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = (np.float64(loss) - reference_loss) / (loss_std / math.sqrt(rows))
    return float(bounded_scores(z))


class QualityMonitor:
    """Windowed accuracy or MAE of one release, with drift-like states when a reference exists."""

    def __init__(self, settings: QualitySettings, reference: QualityReference | None) -> None:
        self.settings = settings
        self.reference = reference
        self.cusum = CusumParams(settings.h, settings.k, clip=6.0)
        self.detector = Cusum()
        self.seq = 0
        self.metric: Literal["accuracy", "mae"] | None = reference.metric if reference else None
        self._losses: list[float] = []
        self.last: QualityWindow | None = None
        self.unscored_rows = 0  # labelled rows with a NaN or Inf prediction or label

    def add(self, remembered: Remembered, labels: Sequence[Label]) -> list[QualityWindow]:
        kind, predictions = predicted_rows(remembered.outputs, remembered.rows)
        metric: Literal["accuracy", "mae"] = "accuracy" if kind == "classification" else "mae"
        if self.metric is None:
            self.metric = metric
        for predicted, label in zip(predictions, labels, strict=True):
            loss = row_loss(metric, predicted, float(label))
            if loss is None:
                self.unscored_rows += 1
            else:
                self._losses.append(loss)
        windows = []
        size = self.settings.window_rows
        while len(self._losses) >= size:
            window, self._losses = self._losses[:size], self._losses[size:]
            windows.append(self._close(window))
        return windows

    def _close(self, losses: list[float]) -> QualityWindow:
        loss = float(np.mean(losses))
        metric = self.metric or "accuracy"
        value = 1.0 - loss if metric == "accuracy" else loss
        z = float("nan")
        reference = self.reference
        if reference is not None and reference.metric == metric:
            reference_loss = 1.0 - reference.value if metric == "accuracy" else reference.value
            z = window_z(loss, reference_loss, reference.loss_std, len(losses))
        previous = self.detector.state
        self.detector = self.detector.step(z, self.cusum)
        self.seq += 1
        self.last = QualityWindow(self.seq, metric, len(losses), value, z, self.detector, previous)
        return self.last

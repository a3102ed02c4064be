"""Make a model's drift baseline pack from its training data (cloud side).

``python -m deployment baseline --data train.npy --model model.onnx -o baseline.json``

The pack (schema in :mod:`agent.observation.baseline`) profiles the model's input features and
its outputs on the training data and calibrates the detector by resampling: windows of each
size on the grid are drawn from one half of the data and scored against the other half's
reference, so the null spread includes the reference's own sampling noise (the device compares
fresh data with a finite training sample too); the CUSUM threshold is then set so that scores
like these raise no more than the target number of false alarms per 10,000 rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.observation.baseline import (
    BASELINE_SCHEMA,
    BaselinePack,
    Extractor,
    Source,
    evidence,
)
from agent.observation.counts import Binning, equal_frequency_edges
from agent.observation.detector import calibrate_threshold
from agent.observation.quality import predicted_rows

__all__ = [
    "BaselineOptions",
    "build_baseline",
    "js_rows",
    "load_table",
    "model_outputs",
    "plan_features",
]

Floats = npt.NDArray[np.float64]
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class BaselineOptions:
    bins: int = 20
    max_features: int = 32
    max_categories: int = 32
    window_sizes: tuple[int, ...] = (50, 100, 200, 500, 1000)
    # Below the 0.1 goal on purpose: resampled nulls under-represent the far tail.
    false_alarms_per_10k: float = 0.02
    resamples: int = 2000
    k: float = 0.5
    # Large enough that one window far outside the null alarms alone (bench.drift: same false
    # alarms as 6, a window sooner on big changes).
    clip: float = 10.0
    simulated_windows: int = 100_000  # CUSUM runs that set each threshold
    seed: int = 0

    def __post_init__(self) -> None:
        if not 16 <= self.bins <= 32:
            raise ValueError(f"bins must be in 16..32, got {self.bins}")
        if self.max_features < 1 or self.resamples < 10 or not self.window_sizes:
            raise ValueError("max_features >= 1, resamples >= 10 and a window size are needed")


# --- reading training data -------------------------------------------------------------------


def load_table(path: Path) -> tuple[Array, tuple[str, ...] | None]:
    """Training inputs from ``.npy`` (batch first) or ``.csv`` (numbers, optional header)."""
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim < 1 or array.shape[0] < 2:
            raise ValueError(f"{path}: need at least 2 rows, got shape {array.shape}")
        return array, None
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
        if not rows:
            raise ValueError(f"{path}: empty file")
        header: tuple[str, ...] | None = None
        if any(not _is_number(cell) for cell in rows[0]):
            header, rows = tuple(c.strip() for c in rows[0]), rows[1:]
        try:
            array = np.array([[float(c) if c.strip() else np.nan for c in r] for r in rows])
        except ValueError as e:
            raise ValueError(f"{path}: not a table of numbers ({e})") from None
        if array.ndim != 2 or array.shape[0] < 2:
            raise ValueError(f"{path}: need a rectangular table of at least 2 rows")
        if header is not None and len(header) != array.shape[1]:
            raise ValueError(f"{path}: {len(header)} names for {array.shape[1]} columns")
        return array, header
    raise ValueError(f"{path}: training data must be .npy or .csv")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return not cell.strip()
    return True


def model_outputs(model: Path, data: Array, batch: int = 1024) -> tuple[str, dict[str, Array]]:
    """Run the model on the training inputs; returns its input name and every output."""
    import onnxruntime as ort  # noqa: PLC0415 (only this command needs it)

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{model}: baselines cover one-input models; it has {len(inputs)}")
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(inputs[0].type)
    cast = data.astype(dtype) if dtype is not None else data
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[Array]] = {n: [] for n in names}
    for start in range(0, cast.shape[0], batch):
        results = session.run(names, {inputs[0].name: cast[start : start + batch]})
        for name, value in zip(names, results, strict=True):
            if isinstance(value, np.ndarray):
                parts[name].append(value)
    return inputs[0].name, {n: np.concatenate(p) for n, p in parts.items() if p}


# --- which features ------------------------------------------------------------------------


@dataclass
class _Plan:
    features: list[tuple[str, Source, Literal["numeric", "categorical"]]] = field(
        default_factory=list
    )
    skipped: list[dict[str, str]] = field(default_factory=list)


def _kind(
    values: Floats, dtype: np.dtype[Any], max_categories: int
) -> Literal["numeric", "categorical"]:
    finite = values[np.isfinite(values)]
    if dtype.kind in "biu" and np.unique(finite).size <= max_categories:
        return "categorical"
    return "numeric"


def plan_features(
    tensors: Mapping[str, tuple[Literal["input", "output"], Array]],
    names: Mapping[str, Sequence[str]],
    options: BaselineOptions,
) -> _Plan:
    """Pick the features: inputs (positions of small rows, channel means of image-like rows),
    then outputs (value, or top-class confidence and class), capped in total. The outputs are
    planned first so that wide inputs cannot crowd them out (they get up to a quarter)."""
    outputs = {n: t for n, t in tensors.items() if t[0] == "output"}
    inputs = {n: t for n, t in tensors.items() if t[0] == "input"}
    planned_outputs = _plan(outputs, names, options, max(1, options.max_features // 4))
    plan = _plan(inputs, names, options, options.max_features - len(planned_outputs.features))
    plan.features += planned_outputs.features
    plan.skipped += planned_outputs.skipped
    return plan


def _plan(
    tensors: Mapping[str, tuple[Literal["input", "output"], Array]],
    names: Mapping[str, Sequence[str]],
    options: BaselineOptions,
    cap: int,
) -> _Plan:
    plan = _Plan()
    for tensor, (role, array) in tensors.items():
        if array.dtype.kind in "OSUV":
            plan.skipped.append({"tensor": tensor, "reason": "bytes"})
            continue
        rows = array.shape[0]
        row_shape = array.shape[1:]
        width = int(np.prod(row_shape)) if row_shape else 1
        candidates: list[tuple[str, Source]] = []
        if role == "output" and width > 1 and array.dtype.kind == "f":
            candidates = [
                (
                    f"{tensor}:confidence",
                    Source(tensor=tensor, role=role, reduce="row_max", index=0),
                ),
                (f"{tensor}:class", Source(tensor=tensor, role=role, reduce="row_argmax", index=0)),
            ]
        elif len(row_shape) >= 2 and width > options.max_features:
            candidates = [
                (
                    f"{tensor}:channel{c}",
                    Source(tensor=tensor, role=role, reduce="channel_mean", index=c),
                )
                for c in range(row_shape[0])
            ]
        else:
            given = names.get(tensor, ())
            candidates = [
                (
                    given[i] if i < len(given) else (f"{tensor}[{i}]" if width > 1 else tensor),
                    Source(tensor=tensor, role=role, reduce="position", index=i),
                )
                for i in range(width)
            ]
        for name, source in candidates:
            values = Extractor([source])({tensor: array}, rows)[:, 0]
            finite = values[np.isfinite(values)]
            if finite.size == 0 or finite.min() == finite.max():
                plan.skipped.append({"tensor": tensor, "reason": "constant"})
                continue
            if len(plan.features) >= cap:
                plan.skipped.append({"tensor": tensor, "reason": "feature_cap"})
                continue
            kind: Literal["numeric", "categorical"] = (
                "categorical"
                if source.reduce == "row_argmax"
                else _kind(values, array.dtype, options.max_categories)
            )
            plan.features.append((name, source, kind))
    return plan


# --- profile and calibrate -----------------------------------------------------------------


def _cuts(values: Floats, kind: str, bins: int) -> Floats:
    if kind == "categorical":
        return np.unique(values[np.isfinite(values)])
    return equal_frequency_edges(values, bins)


def _describe(
    name: str, source: Source, kind: Literal["numeric", "categorical"], cuts: Floats, values: Floats
) -> dict[str, Any]:
    binning = Binning(kind, cuts)
    counts = binning.count(values)
    finite = values[np.isfinite(values)]
    std = float(finite.std())
    return {
        "name": name,
        "source": source.model_dump(),
        "kind": kind,
        "cuts": [float(c) for c in cuts],
        "reference": (counts / counts.sum()).tolist(),
        "mean": float(finite.mean()),
        "std": std if std > 0 else 1e-12,
        "min": float(finite.min()),
        "max": float(finite.max()),
        "missing_rate": float(np.isnan(values).mean()),
    }


def js_rows(reference: Floats, counts: npt.NDArray[np.int64]) -> Floats:
    """Jensen-Shannon divergence (bits) of each row of ``counts`` against ``reference``;
    the vectorised twin of :func:`agent.observation.divergence.jensen_shannon`."""
    p = reference / reference.sum()
    totals = counts.sum(axis=1, keepdims=True)
    q = counts / np.maximum(totals, 1)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=1)
    return np.asarray(np.clip((kl_p + kl_q) / 2, 0.0, 1.0), dtype=np.float64)


@dataclass(frozen=True)
class _HeldOut:
    """The half of the training data that calibration windows are drawn from."""

    indices: npt.NDArray[np.int64]  # rows x features bin indices
    values: Floats  # rows x features
    sizes: Sequence[int]  # bins per feature


def _null_statistics(
    reference: list[dict[str, Any]],
    held_out: _HeldOut,
    rows: int,
    resamples: int,
    rng: np.random.Generator,
) -> Floats:
    """Statistics of ``resamples`` windows of ``rows`` rows drawn from the held-out half:
    ``resamples x features x 3`` (divergence, shift, spread as the device computes them)."""
    count, sizes = len(reference), held_out.sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = int(np.sum(sizes))
    stats = np.empty((resamples, count, 3))
    ref_mean = np.array([f["mean"] for f in reference])
    ref_std = np.array([f["std"] for f in reference])
    for chunk in range(0, resamples, 100):  # bounded memory: 100 windows at a time
        picks = rng.integers(0, held_out.indices.shape[0], size=(min(100, resamples - chunk), rows))
        flat = (held_out.indices[picks] + offsets).reshape(picks.shape[0], -1)
        counts = np.stack([np.bincount(r, minlength=total) for r in flat])
        part = stats[chunk : chunk + picks.shape[0]]
        for f, feature in enumerate(reference):
            block = counts[:, offsets[f] : offsets[f] + sizes[f]]
            part[:, f, 0] = js_rows(np.asarray(feature["reference"]), block)
        window = held_out.values[picks]  # windows x rows x features
        finite = np.isfinite(window)
        present = np.maximum(finite.sum(axis=1), 1)
        kept = np.where(finite, window, 0.0)
        means = kept.sum(axis=1) / present
        variances = np.maximum(0.0, (kept**2).sum(axis=1) / present - means**2)
        part[:, :, 1] = np.abs(means - ref_mean) / (ref_std / np.sqrt(present))
        part[:, :, 2] = np.abs(variances / ref_std**2 - 1.0) * np.sqrt(present / 2)
        part[finite.sum(axis=1) == 0, 1:] = 0.0
    return stats


# The smallest null spread of each statistic (divergence in bits, shift and spread in standard
# errors). A feature whose rare values never fall in the resampled windows would otherwise get
# a spread of ~0, and its first rare value on the device would read as infinite evidence.
_NULL_SPREAD_FLOOR = np.array([1e-3, 0.1, 0.1])


def _floor(x: Floats) -> Floats:
    return np.asarray(np.maximum(x, _NULL_SPREAD_FLOOR), dtype=np.float64)


def quality_reference(outputs: Mapping[str, Array], labels: Array) -> dict[str, Any]:
    """Accuracy or MAE of the model's outputs against the training labels, as the device
    computes them from feedback, and the spread of the per-row loss."""
    rows = labels.shape[0]
    kind, predicted = predicted_rows(outputs, rows)
    if len(predicted) != rows:
        raise ValueError(f"{rows} labels for {len(predicted)} predictions")
    truth = labels.reshape(rows, -1)[:, 0].astype(np.float64)
    guesses = np.asarray(predicted)
    if kind == "classification":
        loss = (guesses != truth).astype(np.float64)
        value = 1.0 - float(loss.mean())
    else:
        loss = np.abs(guesses - truth)
        value = float(loss.mean())
    return {
        "metric": "accuracy" if kind == "classification" else "mae",
        "value": value,
        "loss_std": float(max(loss.std(), 1e-6)),
    }


def build_baseline(
    inputs: Mapping[str, Array],
    outputs: Mapping[str, Array],
    options: BaselineOptions,
    names: Mapping[str, Sequence[str]] | None = None,
    labels: Array | None = None,
) -> dict[str, Any]:
    """The baseline pack (a JSON-ready dict, validated against the device's schema)."""
    tensors: dict[str, tuple[Literal["input", "output"], Array]] = {
        **{n: ("input", a) for n, a in inputs.items()},
        **{n: ("output", a) for n, a in outputs.items()},
    }
    rows = {a.shape[0] for _, a in tensors.values()}
    if len(rows) != 1:
        raise ValueError(f"tensors disagree on the number of rows: {sorted(rows)}")
    total_rows = rows.pop()
    plan = plan_features(tensors, names or {}, options)
    if not plan.features:
        raise ValueError("no feature to profile: every tensor is bytes or constant")
    arrays = {n: a for n, (_, a) in tensors.items()}
    values = Extractor([s for _, s, _ in plan.features])(arrays, total_rows)

    cuts = [_cuts(values[:, f], kind, options.bins) for f, (_, _, kind) in enumerate(plan.features)]
    features = [
        _describe(name, source, kind, cuts[f], values[:, f])
        for f, (name, source, kind) in enumerate(plan.features)
    ]

    rng = np.random.default_rng(options.seed)
    order = rng.permutation(total_rows)
    halves = order[: total_rows // 2], order[total_rows // 2 :]
    binnings = [Binning(kind, cuts[f]) for f, (_, _, kind) in enumerate(plan.features)]
    # Each half in turn is the reference and the other the windows' source, so that a rare
    # value found in one half only is seen both as present and as missing.
    splits = [
        (_half_reference(plan, cuts, features, values[ref]), _held_out(binnings, values[held]))
        for ref, held in (halves, halves[::-1])
    ]

    windows = []
    grid = [n for n in options.window_sizes if n <= max(50, total_rows)]
    for n in grid or [min(options.window_sizes)]:
        stats = np.concatenate(
            [
                _null_statistics(reference, held_out, n, options.resamples // 2, rng)
                for reference, held_out in splits
            ]
        )
        means, stds = stats.mean(axis=0), _floor(stats.std(axis=0))
        score = evidence(stats, means, stds).max(axis=1)
        score_mean, score_std = float(score.mean()), float(max(score.std(), 1e-9))
        target = options.false_alarms_per_10k * n / 10_000
        cusum = calibrate_threshold(
            (score - score_mean) / score_std,
            target,
            rng,
            k=options.k,
            clip=options.clip,
            windows=options.simulated_windows,
        )
        windows.append(
            {
                "rows": n,
                "divergence_mean": means[:, 0].tolist(),
                "divergence_std": stds[:, 0].tolist(),
                "shift_mean": means[:, 1].tolist(),
                "shift_std": stds[:, 1].tolist(),
                "spread_mean": means[:, 2].tolist(),
                "spread_std": stds[:, 2].tolist(),
                "score_mean": score_mean,
                "score_std": score_std,
                "h": cusum.h,
                "k": cusum.k,
                "clip": cusum.clip,
            }
        )
    pack = {
        "schema": BASELINE_SCHEMA,
        "rows": total_rows,
        "features": features,
        "skipped": _dedupe(plan.skipped),
        "calibration": {
            "false_alarms_per_10k": options.false_alarms_per_10k,
            "resamples": options.resamples,
            "windows": windows,
        },
    }
    if labels is not None:
        pack["quality"] = quality_reference(outputs, labels)
    BaselinePack.model_validate(pack, strict=False)  # the device's own check, before shipping
    return pack


def _half_reference(
    plan: _Plan, cuts: Sequence[Floats], features: Sequence[dict[str, Any]], values: Floats
) -> list[dict[str, Any]]:
    """The reference as one half of the data describes it (with the full data's cuts); a
    feature nearly constant on the half keeps the full data's spread, so that its shift and
    spread statistics stay finite."""
    reference = []
    for f, (name, source, kind) in enumerate(plan.features):
        column = values[:, f]
        if not np.isfinite(column).any():
            reference.append(dict(features[f]))
            continue
        half = _describe(name, source, kind, cuts[f], column)
        half["std"] = max(half["std"], 0.1 * features[f]["std"])
        reference.append(half)
    return reference


def _held_out(binnings: Sequence[Binning], values: Floats) -> _HeldOut:
    return _HeldOut(
        indices=np.stack([b.indices(values[:, f]) for f, b in enumerate(binnings)], axis=1).astype(
            np.int64
        ),
        values=values,
        sizes=[b.size for b in binnings],
    )


def _dedupe(skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: list[dict[str, str]] = []
    for item in skipped:
        if item not in seen:
            seen.append(item)
    return seen


def window_sizes_arg(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    if not sizes or sizes[0] < 2:
        raise ValueError(f"window sizes must be integers >= 2, got {text!r}")
    return sizes

"""Small drift baseline packs built by the real cloud-side builder, for the device tests."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.observation.baseline import BaselinePack
from deployment.drift.baseline_pack import BaselineOptions, build_baseline

FAST = BaselineOptions(window_sizes=(20, 50), resamples=200, simulated_windows=20_000)


WEIGHTS = np.random.default_rng(3).standard_normal((3, 3))

Tensors = dict[str, npt.NDArray[Any]]


def tabular_rows(
    rng: np.random.Generator, rows: int, shift: float = 0.0
) -> tuple[Tensors, Tensors]:
    """(inputs, outputs) of ``rows`` requests: ``x`` (3 standard normal columns, the first
    shifted by ``shift``), ``c`` (categories 0..3); output ``p``, a softmax of 3 classes."""
    x = rng.standard_normal((rows, 3))
    x[:, 0] += shift
    logits = x @ WEIGHTS
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return {"x": x, "c": rng.integers(0, 4, size=(rows, 1))}, {"p": p.astype(np.float32)}


@cache
def tabular_pack() -> BaselinePack:
    inputs, outputs = tabular_rows(np.random.default_rng(4), 4000)
    return BaselinePack.model_validate(build_baseline(inputs, outputs, FAST), strict=False)

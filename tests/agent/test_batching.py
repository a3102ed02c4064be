"""The batching plan: what shares one ONNX Runtime call (pure)."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pytest

from agent.serving.batching import batch_key, split, stack, take_batch
from agent.serving.engine import CostModel, fit_cost

A, B = "a", "b"


@pytest.mark.parametrize(
    ("pending", "max_rows", "expected"),
    [
        ([], 8, []),
        ([(A, 1)], 8, [0]),
        ([(A, 1), (A, 2), (A, 3)], 8, [0, 1, 2]),
        ([(A, 4), (A, 4), (A, 4)], 8, [0, 1]),
        ([(A, 1), (B, 1), (A, 1)], 8, [0, 2]),
        ([(B, 2), (A, 1), (B, 1)], 8, [0, 2]),
        ([(A, 20), (A, 1)], 8, [0]),
        ([(A, 5), (A, 5), (A, 3)], 8, [0, 2]),
    ],
)
def test_take_batch_keeps_the_head_and_joins_compatible_requests(
    pending: list[tuple[Hashable, int]], max_rows: int, expected: list[int]
) -> None:
    assert take_batch(pending, max_rows) == expected


def test_batch_key_separates_shapes_and_dtypes_but_not_row_counts() -> None:
    one = {"x": np.zeros((1, 4), np.float32)}
    three = {"x": np.zeros((3, 4), np.float32)}
    wider = {"x": np.zeros((1, 5), np.float32)}
    double = {"x": np.zeros((1, 4), np.float64)}
    assert batch_key(one) == batch_key(three)
    assert batch_key(one) != batch_key(wider)
    assert batch_key(one) != batch_key(double)


def test_stack_then_split_returns_each_request_its_own_rows() -> None:
    requests = [{"x": np.full((n, 2), n, np.float32)} for n in (1, 3, 2)]
    stacked = stack(requests)
    assert stacked["x"].shape == (6, 2)
    parts = split([stacked["x"] * 10], [1, 3, 2])
    for request, (output,) in zip(requests, parts, strict=True):
        np.testing.assert_array_equal(output, request["x"] * 10)


def test_split_refuses_outputs_without_the_batch_rows() -> None:
    with pytest.raises(ValueError, match="cannot be split into 3 rows"):
        split([np.zeros(2, np.float32)], [1, 2])


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        ((1, 10e-6, 33, 42e-6), CostModel(fixed_s=9e-6, per_row_s=1e-6)),
        ((1, 10e-6, 33, 8e-6), CostModel(fixed_s=10e-6, per_row_s=0.0)),
        ((1, 10e-6, 1, 12e-6), CostModel(fixed_s=12e-6, per_row_s=0.0)),
    ],
)
def test_cost_is_a_line_through_two_measurements(
    measured: tuple[int, float, int, float], expected: CostModel
) -> None:
    cost = fit_cost(*measured)
    assert cost.fixed_s == pytest.approx(expected.fixed_s)
    assert cost.per_row_s == pytest.approx(expected.per_row_s)

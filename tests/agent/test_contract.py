"""Request validation against a model contract (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.serving.contract import RequestError, RequestLimits, validate_inputs
from wire.contract import ModelContract, TensorSpec

CONTRACT = ModelContract(
    inputs=(
        TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),
        TensorSpec(name="mask", datatype="BOOL", shape=(-1, 4)),
    ),
    outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, 2)),),
)
LIMITS = RequestLimits(max_elements=1000)


def _request(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    inputs = {"x": np.zeros((3, 4), np.float32), "mask": np.ones((3, 4), np.bool_)}
    inputs.update(overrides)
    return inputs


def test_a_valid_request_returns_its_row_count() -> None:
    assert validate_inputs(CONTRACT, _request(), LIMITS) == 3


@pytest.mark.parametrize(
    ("inputs", "reason", "fragment"),
    [
        ({"x": np.zeros((3, 4), np.float32)}, "missing_input", "'mask'"),
        ({**_request(), "z": np.zeros(1, np.float32)}, "unknown_input", "'z'"),
        (
            {"x": np.zeros((3, 4), np.float32), "z": np.ones((3, 4), np.bool_)},
            "unknown_input",
            "'z'",
        ),
        (_request(x=np.zeros((3, 4), np.float64)), "dtype_mismatch", "FP64"),
        (_request(x=np.zeros((3, 4, 1), np.float32)), "rank_mismatch", "rank 2"),
        (_request(x=np.zeros((3, 5), np.float32)), "dim_mismatch", "dimension 1 is 5"),
        (_request(x=np.zeros((2, 4), np.float32)), "dim_mismatch", "other inputs have 2"),
        (_request(x=np.full((3, 4), np.nan, np.float32)), "non_finite", "'x'"),
        (_request(x=np.array([[0, 0, np.inf, 0]] * 3, np.float32)), "non_finite", "NaN or Inf"),
        (
            _request(x=np.zeros((300, 4), np.float32), mask=np.ones((300, 4), np.bool_)),
            "too_large",
            "1000",
        ),
    ],
)
def test_invalid_requests_are_refused_with_a_precise_reason(
    inputs: dict[str, np.ndarray], reason: str, fragment: str
) -> None:
    with pytest.raises(RequestError) as caught:
        validate_inputs(CONTRACT, inputs, LIMITS)
    assert caught.value.reason == reason
    assert fragment in caught.value.message


def test_large_finite_halves_are_not_mistaken_for_infinity() -> None:
    contract = ModelContract(
        inputs=(TensorSpec(name="h", datatype="FP16", shape=(-1, 8)),), outputs=()
    )
    big = np.full((64, 8), 60000, np.float16)
    assert validate_inputs(contract, {"h": big}, RequestLimits()) == 64


def test_non_finite_values_pass_when_allowed() -> None:
    limits = RequestLimits(allow_non_finite=True)
    assert validate_inputs(CONTRACT, _request(x=np.full((3, 4), np.nan, np.float32)), limits) == 3


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (CONTRACT, []),
        (
            ModelContract(inputs=CONTRACT.inputs[:1], outputs=CONTRACT.outputs),
            ["input 'mask' removed"],
        ),
        (
            ModelContract(
                inputs=(TensorSpec(name="x", datatype="FP16", shape=(-1, 4)), CONTRACT.inputs[1]),
                outputs=CONTRACT.outputs,
            ),
            ["input 'x' datatype FP32 -> FP16"],
        ),
        (
            ModelContract(
                inputs=CONTRACT.inputs,
                outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, 3)),),
            ),
            ["output 'y' shape [-1, 2] -> [-1, 3]"],
        ),
    ],
)
def test_contract_differences_name_each_change(other: ModelContract, expected: list[str]) -> None:
    assert CONTRACT.differences(other) == expected


@pytest.mark.parametrize(
    ("contract", "batchable"),
    [
        (CONTRACT, True),
        (
            ModelContract(
                inputs=(TensorSpec(name="x", datatype="FP32", shape=(1, 4)),),
                outputs=CONTRACT.outputs,
            ),
            False,
        ),
        (
            ModelContract(
                inputs=CONTRACT.inputs,
                outputs=(TensorSpec(name="s", datatype="FP32", shape=()),),
            ),
            False,
        ),
    ],
)
def test_only_contracts_with_a_symbolic_first_dim_batch(
    contract: ModelContract, batchable: bool
) -> None:
    assert contract.batchable is batchable

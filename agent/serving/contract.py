"""Checking requests against a model's tensor contract (`wire.contract.ModelContract`).

Pure: values in, values or `RequestError` out. Datatype names are the Open Inference
Protocol v2 ones (``FP32``, ``INT64``, ``BYTES``...), the same on the wire and in manifests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
from pydantic import Field

from agent.config import Section
from wire.contract import Datatype, ModelContract, TensorSpec
from wire.reasons import AgentError, Reason

# v2 datatype -> numpy dtype. BYTES travels as numpy object arrays of `str` (ONNX Runtime's
# tensor(string) form).
V2_TO_NUMPY: Final[Mapping[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: Final[Mapping[np.dtype[np.generic], str]] = {v: k for k, v in V2_TO_NUMPY.items()}

# ONNX Runtime's type strings (`NodeArg.type`) -> v2 datatype.
ONNX_TO_V2: Final[Mapping[str, Datatype]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class RequestError(AgentError):
    """A request the model cannot take."""


def numpy_dtype(spec: TensorSpec) -> np.dtype[np.generic]:
    """The numpy dtype a tensor of `spec` is held in (BYTES: object arrays of `bytes`)."""
    return V2_TO_NUMPY[spec.datatype]


class RequestLimits(Section):
    """Per-request bounds. Non-finite floats are refused unless a model is known to want them."""

    max_elements: int = Field(1 << 22, ge=1, alias="max_request_elements")
    allow_non_finite: bool = False


class InputValidator:
    """Checks decoded requests against one contract; built once per model, run per request.

    The per-tensor expectations are flattened into tuples up front, so a request costs a few
    comparisons and one vectorised finiteness test (about 2.5 µs for a small request).
    """

    __slots__ = ("_batchable", "_checks", "_limits", "_names")

    def __init__(self, contract: ModelContract, limits: RequestLimits) -> None:
        self._limits = limits
        self._batchable = contract.batchable
        self._names = frozenset(spec.name for spec in contract.inputs)
        self._checks = tuple(
            (
                spec,
                numpy_dtype(spec),
                len(spec.shape),
                spec.fixed_dims(),
                not limits.allow_non_finite and numpy_dtype(spec).kind == "f",
            )
            for spec in contract.inputs
        )

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Return the request's row count (axis 0), or raise `RequestError` saying what is wrong."""
        if len(inputs) != len(self._names) or not self._names.issuperset(inputs):
            self._refuse_names(inputs)
        elements = 0
        rows = -1
        for spec, dtype, rank, fixed, check_finite in self._checks:
            array = inputs[spec.name]
            if array.dtype != dtype:
                got = NUMPY_TO_V2.get(array.dtype, str(array.dtype))
                raise RequestError(
                    Reason.DTYPE_MISMATCH,
                    f"input {spec.name!r} has datatype {got}, model expects {spec.datatype}",
                )
            shape = array.shape
            if len(shape) != rank:
                raise RequestError(
                    Reason.RANK_MISMATCH,
                    f"input {spec.name!r} has shape {list(shape)}, model expects rank "
                    f"{rank} {spec.v2_shape}",
                )
            for axis, dim in fixed:
                if shape[axis] != dim:
                    raise RequestError(
                        Reason.DIM_MISMATCH,
                        f"input {spec.name!r} dimension {axis} is {shape[axis]}, "
                        f"model expects {dim}",
                    )
            elements += array.size
            if elements > self._limits.max_elements:
                raise RequestError(
                    Reason.TOO_LARGE,
                    f"request has over {self._limits.max_elements} elements, the limit",
                )
            if shape:
                if rows < 0:
                    rows = shape[0]
                elif shape[0] != rows and self._batchable:
                    raise RequestError(
                        Reason.DIM_MISMATCH,
                        f"input {spec.name!r} has {shape[0]} rows, other inputs have {rows}",
                    )
            if check_finite and not np.isfinite(array).all():
                raise RequestError(Reason.NON_FINITE, f"input {spec.name!r} contains NaN or Inf")
        return max(rows, 1)

    def _refuse_names(self, inputs: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(inputs) - self._names)
        if unknown:
            raise RequestError(
                Reason.UNKNOWN_INPUT,
                f"unknown input {unknown[0]!r}; model takes {sorted(self._names)}",
            )
        missing = sorted(self._names - set(inputs))
        raise RequestError(Reason.MISSING_INPUT, f"missing input {missing[0]!r}")


def validate_inputs(
    contract: ModelContract, inputs: Mapping[str, np.ndarray], limits: RequestLimits
) -> int:
    """One-off check of a request against a contract; see `InputValidator`."""
    return InputValidator(contract, limits)(inputs)

"""Tensor contracts: what a model accepts and returns, and checking requests against it.

Pure: values in, values or `RequestError` out. Datatype names are the Open Inference
Protocol v2 ones (``FP32``, ``INT64``, ``BYTES``...), the same on the wire and in manifests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
from pydantic import Field

from agent.config import Section
from agent.reasons import AgentError, Reason

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
ONNX_TO_V2: Final[Mapping[str, str]] = {
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


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor. A `None` dimension is symbolic (any size); v2 metadata shows it as -1."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]

    @property
    def v2_shape(self) -> list[int]:
        return [-1 if dim is None else dim for dim in self.shape]

    @property
    def numpy_dtype(self) -> np.dtype[np.generic]:
        return V2_TO_NUMPY[self.datatype]


@dataclass(frozen=True, slots=True)
class ModelContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batchable(self) -> bool:
        """Requests can be stacked along axis 0 only if every tensor has a symbolic first dim."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] is None for t in tensors)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def differences(self, other: ModelContract) -> list[str]:
        """What a caller of `self` would see change if it were replaced by `other`."""
        found: list[str] = []
        for kind, mine, theirs in (
            ("input", self.inputs, other.inputs),
            ("output", self.outputs, other.outputs),
        ):
            a = {t.name: t for t in mine}
            b = {t.name: t for t in theirs}
            found += [f"{kind} {n!r} removed" for n in sorted(a.keys() - b.keys())]
            found += [f"{kind} {n!r} added" for n in sorted(b.keys() - a.keys())]
            for name in sorted(a.keys() & b.keys()):
                if a[name].datatype != b[name].datatype:
                    found.append(
                        f"{kind} {name!r} datatype {a[name].datatype} -> {b[name].datatype}"
                    )
                if a[name].v2_shape != b[name].v2_shape:
                    found.append(f"{kind} {name!r} shape {a[name].v2_shape} -> {b[name].v2_shape}")
        return found


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
                spec.numpy_dtype,
                len(spec.shape),
                tuple((axis, dim) for axis, dim in enumerate(spec.shape) if dim is not None),
                not limits.allow_non_finite and spec.numpy_dtype.kind == "f",
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

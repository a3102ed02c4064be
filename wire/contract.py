"""The tensor contract: what a model takes and gives, in the one form every side uses.

The publisher reads it off the model, the manifest carries it, the device checks the loaded
model and every request against it, the profiler builds its releases with it. Datatype names
are the Open Inference Protocol v2 ones (``FP32``, ``INT64``, ``BYTES``...); a dimension of -1
is symbolic (any size, such as the batch), as v2 metadata and manifests spell it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from wire.base import WireModel

__all__ = ["SYMBOLIC", "Datatype", "ModelContract", "TensorName", "TensorSpec", "unique_names"]

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
TensorName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
SYMBOLIC = -1


class TensorSpec(WireModel):
    """One named tensor of a contract."""

    name: TensorName
    datatype: Datatype
    shape: tuple[Annotated[int, Field(ge=SYMBOLIC)], ...] = Field(max_length=16)

    @property
    def v2_shape(self) -> list[int]:
        return list(self.shape)

    def fixed_dims(self) -> tuple[tuple[int, int], ...]:
        """(axis, size) of every dimension that is not symbolic."""
        return tuple((axis, dim) for axis, dim in enumerate(self.shape) if dim != SYMBOLIC)

    def concrete_shape(self, rows: int) -> tuple[int, ...]:
        """A shape that fits: `rows` along a symbolic axis 0, 1 along any other symbolic axis."""
        return tuple(
            dim if dim != SYMBOLIC else (rows if axis == 0 else 1)
            for axis, dim in enumerate(self.shape)
        )


def unique_names(names: Iterable[str], where: str) -> None:
    """Raise ValueError if two tensors of one list share a name."""
    names = list(names)
    if len(names) != len(set(names)):
        raise ValueError(f"duplicate tensor names in {where}")


class ModelContract(WireModel):
    """The tensors a model takes and gives, as read off the loaded model or off a manifest."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @model_validator(mode="after")
    def _names_unique(self) -> Self:
        unique_names((t.name for t in self.inputs), "inputs")
        unique_names((t.name for t in self.outputs), "outputs")
        return self

    @property
    def batchable(self) -> bool:
        """Requests can be stacked along axis 0 only if every tensor has a symbolic first dim."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == SYMBOLIC for t in tensors)

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

"""The release manifest's shape: fields and the document's own consistency. Pure.

A release manifest tells a device which model to fetch and how to check it. The exact schema
(unknown fields are rejected at every level; JSON types are strict: ``1`` is not ``1.0``,
``"1"`` is not ``1``)::

    {
      "schema":   1 or 2, default 1; 2 is required by "baseline"                (optional)
      "name":     str,  1-63 chars of [A-Za-z0-9._-], starting with a letter or digit
      "version":  int >= 1, strictly increasing per name
      "sha256":   64 lowercase hex chars, digest of the artifact bytes
      "size":     int > 0, artifact length in bytes (the download cap)
      "url":      str, where to fetch it (checked against the device's URL policy later)
      "created":  RFC 3339 timestamp with a UTC offset
      "expires":  RFC 3339 timestamp with a UTC offset, later than "created"   (optional)
      "contract": {"inputs":  [TensorSpec, ...],  "outputs": [TensorSpec, ...]}
      "contract_change": bool, default false: allow a contract that differs from the active
                         model's (otherwise the swap refuses it)               (optional)
      "baseline": {"sha256": hex64, "size": int > 0, "url": str}
                  the drift baseline pack (JSON), verified like the model  (optional, schema 2)
      "golden":   {"inputs": [Tensor, ...], "outputs": [Tensor, ...], "atol": float >= 0}
                                                                               (optional)
      "signature": {"key_id": str, "value": base64 of the 64-byte Ed25519 signature}
    }

    TensorSpec = {"name": str, "datatype": OIP v2 datatype, "shape": [int >= -1, ...]}
                 (-1 marks a symbolic dimension such as the batch; `wire.contract`)
    Tensor     = {"name": str, "datatype": OIP v2 datatype, "shape": [int >= 0, ...],
                  "data": [number | bool | str, ...] flat, row-major, len == prod(shape)}

Signing and verifying (Ed25519, trusted keys) are the agent's (`agent.releases.manifest`):
this module only says what a well-formed document is. The publisher builds an
:class:`UnsignedManifest` and signs its JSON; the device parses what it verified into a
:class:`ReleaseManifest`.

Room for variants: another issue adds manifest variants. They will become further models here
(a union discriminated on a field of the document), each a `WireModel` reusing these parts;
this module does not implement any yet.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import AwareDatetime, Field, StringConstraints, field_serializer, model_validator

from wire.base import WireModel
from wire.contract import Datatype, ModelContract, TensorName, TensorSpec, unique_names

__all__ = [
    "MAX_BASELINE_BYTES",
    "MAX_MANIFEST_BYTES",
    "Baseline",
    "Contract",
    "Golden",
    "ReleaseManifest",
    "Signature",
    "Tensor",
    "UnsignedManifest",
]

# A desired twin is at most 32 KB, so a bigger manifest cannot be genuine; refusing it early
# bounds the work done on untrusted input. The release folder reads manifest files up to this
# size too (publishers write them compact, as signed).
MAX_MANIFEST_BYTES = 32 * 1024

# The largest drift baseline pack a device accepts (the manifest's size cap and the parser's).
MAX_BASELINE_BYTES = 4 * 1024 * 1024

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
KeyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class Contract(ModelContract):
    """The model contract as a manifest carries it: at least one tensor each way, at most 64."""

    inputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=64)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=64)


class Tensor(WireModel):
    """A concrete v2 tensor (golden sample): flat row-major ``data`` of ``prod(shape)`` items."""

    name: TensorName
    datatype: Datatype
    shape: tuple[Annotated[int, Field(ge=0)], ...] = Field(max_length=16)
    data: tuple[bool | int | float | str, ...] = Field(max_length=8192)

    @model_validator(mode="after")
    def _data_fills_shape(self) -> Self:
        if len(self.data) != math.prod(self.shape):
            raise ValueError(
                f"data has {len(self.data)} items, shape needs {math.prod(self.shape)}"
            )
        return self


class Golden(WireModel):
    """A known input and its expected output, checked at warm-up within ``atol``."""

    inputs: tuple[Tensor, ...] = Field(min_length=1, max_length=64)
    outputs: tuple[Tensor, ...] = Field(min_length=1, max_length=64)
    atol: float = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _names_unique(self) -> Self:
        unique_names((t.name for t in self.inputs), "golden inputs")
        unique_names((t.name for t in self.outputs), "golden outputs")
        return self


class Baseline(WireModel):
    """The drift baseline (training-data profile) shipped beside the model."""

    sha256: Sha256Hex
    size: int = Field(gt=0, le=MAX_BASELINE_BYTES)
    url: Url


class Signature(WireModel):
    """Ed25519 signature over the canonical JSON of the other fields."""

    key_id: KeyId
    value: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class UnsignedManifest(WireModel):
    """Every field but the signature: what the publisher builds and signs."""

    # Schema 2 added the baseline (with its size); a schema-1 document cannot carry one.
    schema_: Literal[1, 2] = Field(1, alias="schema")
    name: ModelName
    version: int = Field(ge=1, le=2**53)  # 2**53: still exact in any JSON parser
    sha256: Sha256Hex
    size: int = Field(gt=0, le=2**40)
    url: Url
    created: AwareDatetime
    expires: AwareDatetime | None = None
    contract: Contract
    contract_change: bool = False
    baseline: Baseline | None = None
    golden: Golden | None = None

    @model_validator(mode="after")
    def _expires_after_created(self) -> Self:
        if self.expires is not None and self.expires <= self.created:
            raise ValueError("expires must be later than created")
        if self.baseline is not None and self.schema_ < 2:
            raise ValueError("a baseline needs schema 2")
        return self

    @field_serializer("created", "expires")
    def _rfc3339(self, at: datetime | None) -> str | None:
        # isoformat keeps the offset as written (+00:00), as publishers have always signed it.
        return None if at is None else at.isoformat()

    def document(self) -> dict[str, object]:
        """The JSON document: defaults left out, so a schema-1 manifest stays schema-1 shaped.

        Absent optional fields are left out, never written as null: a null in a desired twin
        patch deletes the key, so the device would verify a document other than the signed one.
        (`exclude_none` too, because `exclude_defaults` does not see through the serializer.)
        """
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)


class ReleaseManifest(UnsignedManifest):
    """A signed release manifest; on the device, obtain one from `verify_manifest`."""

    signature: Signature

"""The model as the child agent receives it: artifacts in a release folder, signed manifests.

A key is made for the run, so the release goes through the agent's real install path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import public_key_to_b64, sign_manifest
from agent.serving.contract import numpy_dtype
from agent.serving.engine import ModelLoadError, RuntimeOptions, create_session, read_contract
from wire.contract import ModelContract
from wire.manifest import Contract, UnsignedManifest

MODEL_NAME = "profiled"
KEY_ID = "profile"
MANIFEST = "model.manifest.json"


def _release_document(
    model: bytes, version: int, key: Ed25519PrivateKey, contract: ModelContract
) -> bytes:
    # No golden sample: the profiler measures the agent, the publisher vouches for outputs.
    sha = hashlib.sha256(model).hexdigest()
    unsigned = UnsignedManifest(
        name=MODEL_NAME,
        version=version,
        sha256=sha,
        size=len(model),
        url=f"https://profile.invalid/{sha}.onnx",
        created=datetime.now(UTC),
        contract=Contract(inputs=contract.inputs, outputs=contract.outputs),
    )
    return json.dumps(sign_manifest(unsigned, key, KEY_ID)).encode()


def _with_doc_string(model: bytes, text: bytes) -> bytes:
    """`model` with its `ModelProto.doc_string` (field 6) set to `text`.

    Protobuf merges a serialized message with fields appended to it, the last value of a
    singular field winning: the graph and weights stay as they are, the sha256 changes.
    """
    if len(text) >= 0x80:
        raise ValueError("a doc string this long needs a multi-byte length")
    return model + bytes([6 << 3 | 2, len(text)]) + text


def _contract_and_request(model: bytes) -> tuple[ModelContract, bytes]:
    """The model's contract, and a batch-1 v2 request body for it."""
    session = create_session(model, RuntimeOptions())
    contract = read_contract(session)
    rng = np.random.default_rng(0)
    tensors = []
    for spec in contract.inputs:
        if spec.datatype == "BYTES":
            raise ModelLoadError(f"input {spec.name!r} takes strings; the profiler sends numbers")
        shape = list(spec.concrete_shape(1))
        data = rng.standard_normal(shape).astype(numpy_dtype(spec))
        tensors.append(
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": data.tolist()}
        )
    body = json.dumps({"inputs": [_flat(t) for t in tensors]}).encode()
    return contract, body


def _flat(tensor: dict[str, Any]) -> dict[str, Any]:
    return {**tensor, "data": np.asarray(tensor["data"]).ravel().tolist()}


@dataclass(frozen=True, slots=True)
class Release:
    """Models as the child receives them: artifacts in a release folder, signed manifests.

    Version n serves `models[(n - 1) % len(models)]`; they share one contract and request
    body.
    """

    models: tuple[bytes, ...]
    folder: Path
    key: Ed25519PrivateKey
    contract: ModelContract
    body: bytes

    @classmethod
    def prepare(cls, models: Sequence[bytes], folder: Path) -> Release:
        """Write the artifacts into `folder`, read the contract, make a signing key.

        One model is paired with a copy that differs in its bytes alone, so a swap to it
        takes the path of a new artifact (copied into the store, hashed, read), as on a
        device: re-releasing identical bytes skips that and measured ~8 MiB less at the peak.
        """
        if len(models) == 1:
            models = [models[0], _with_doc_string(models[0], b"agent profile: swap candidate")]
        contract, body = _contract_and_request(models[0])
        folder.mkdir(parents=True, exist_ok=True)
        for model in models:
            (folder / f"{hashlib.sha256(model).hexdigest()}.onnx").write_bytes(model)
        return cls(tuple(models), folder, Ed25519PrivateKey.generate(), contract, body)

    @property
    def trusted_keys(self) -> str:
        return f"{KEY_ID}={public_key_to_b64(self.key.public_key())}"

    def document(self, version: int) -> bytes:
        model = self.models[(version - 1) % len(self.models)]
        return _release_document(model, version, self.key, self.contract)

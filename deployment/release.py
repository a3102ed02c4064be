"""Building signed release manifests from model bytes (the publisher's core, and test fixtures).

The contract and the golden sample are read off the model with ONNX Runtime itself, so the
device checks the artifact against exactly what the publisher observed.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import sign_manifest
from agent.serving.contract import NUMPY_TO_V2, ModelContract, TensorSpec
from agent.serving.engine import read_contract


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": spec.v2_shape}


def _tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": NUMPY_TO_V2[array.dtype],
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def golden_sample(
    session: ort.InferenceSession, contract: ModelContract, *, rows: int = 1, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A seeded input of `rows` rows and the outputs this model gives for it."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        shape = tuple(
            (rows if axis == 0 else 1) if dim is None else dim
            for axis, dim in enumerate(spec.shape)
        )
        inputs[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
    outputs = session.run(list(contract.output_names), inputs)
    return inputs, dict(zip(contract.output_names, outputs, strict=True))


def build_manifest(
    model: bytes,
    *,
    name: str,
    version: int,
    url: str,
    key: Ed25519PrivateKey,
    key_id: str,
    created: datetime | None = None,
    valid_for: timedelta | None = None,
    golden_atol: float | None = 1e-4,
    contract_change: bool = False,
) -> dict[str, Any]:
    """A signed manifest for `model` served at `url`."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    contract = read_contract(session)
    created = created or datetime.now(UTC)
    unsigned: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
        "url": url,
        "created": created.isoformat(),
        "contract": {
            "inputs": [_spec_json(s) for s in contract.inputs],
            "outputs": [_spec_json(s) for s in contract.outputs],
        },
    }
    if valid_for is not None:
        unsigned["expires"] = (created + valid_for).isoformat()
    if contract_change:
        unsigned["contract_change"] = True
    if golden_atol is not None:
        inputs, outputs = golden_sample(session, contract)
        unsigned["golden"] = {
            "inputs": [_tensor_json(n, a) for n, a in inputs.items()],
            "outputs": [_tensor_json(n, a) for n, a in outputs.items()],
            "atol": golden_atol,
        }
    return sign_manifest(unsigned, key, key_id)

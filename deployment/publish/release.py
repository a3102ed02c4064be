"""Building signed release manifests from model bytes (the publisher's core, and test fixtures).

The contract and the golden sample are read off the model with ONNX Runtime itself, so the
device checks the artifact against exactly what the publisher observed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.releases.lifecycle import golden_arrays, golden_mismatches
from agent.releases.manifest import ManifestRejected, schema_message, sign_manifest
from agent.releases.onnx_check import HostileModel, inspect_model
from agent.serving.contract import NUMPY_TO_V2, numpy_dtype
from agent.serving.engine import read_contract
from wire.contract import ModelContract
from wire.manifest import Golden, UnsignedManifest
from wire.reasons import Reason, ReasonedError


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
        shape = spec.concrete_shape(rows)
        inputs[spec.name] = rng.standard_normal(shape).astype(numpy_dtype(spec))
    outputs = session.run(list(contract.output_names), inputs)
    return inputs, dict(zip(contract.output_names, outputs, strict=True))


class ModelCheckError(ReasonedError, ValueError):
    """Model bytes a device would refuse: ``reason`` is ``model_invalid`` or ``golden_mismatch``."""


def describe_model(model: bytes, *, golden_atol: float | None = 1e-4) -> dict[str, Any]:
    """The manifest fields read off the model bytes: sha256, size, contract, golden sample.

    The bytes go through the device's own checks first (the hostile-file check, then ONNX
    Runtime), and the golden sample is replayed on a second session: a model whose outputs are
    NaN or not reproducible would fail its warm-up on every device, so it fails here instead.
    """
    try:
        inspect_model(model)
    except HostileModel as e:
        raise ModelCheckError(Reason.MODEL_INVALID, str(e)) from e
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own untyped errors for unloadable graphs
        raise ModelCheckError(Reason.MODEL_INVALID, f"ONNX Runtime cannot load it: {e}") from e
    described = _fields(model, session, golden_atol)
    if "golden" in described:
        _replay_golden(model, described["golden"])
    return described


def contract_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """How a model's tensor contract differs from another's (pure), one phrase per tensor:
    callers built against the old one break on any of these."""
    changes = []
    for side in ("inputs", "outputs"):
        before = {t["name"]: t for t in old.get(side, ())}
        after = {t["name"]: t for t in new.get(side, ())}
        kind = side[:-1]
        for name in sorted(before.keys() - after.keys()):
            changes.append(f"{kind} {name!r} removed")
        for name in sorted(after.keys() - before.keys()):
            changes.append(f"{kind} {name!r} added")
        for name in sorted(before.keys() & after.keys()):
            was, now = before[name], after[name]
            if was["datatype"] != now["datatype"]:
                changes.append(f"{kind} {name!r} {was['datatype']} -> {now['datatype']}")
            if list(was["shape"]) != list(now["shape"]):
                changes.append(
                    f"{kind} {name!r} shape {list(was['shape'])} -> {list(now['shape'])}"
                )
    return changes


def map_outputs_error(output_types: dict[str, str]) -> str | None:
    """What to change when outputs are maps, not tensors (pure): skl2onnx's default ZipMap on a
    classifier's probabilities, which the agent cannot serve as a V2 tensor."""
    maps = sorted(name for name, kind in output_types.items() if "map(" in kind)
    if not maps:
        return None
    return (
        f"output(s) {', '.join(repr(n) for n in maps)} are ZipMap maps (skl2onnx's default for"
        " classifiers), not tensors the agent can serve: convert with"
        ' to_onnx(model, X, options={id(model): {"zipmap": False}})'
        " (in a pipeline, name the classifier step; or convert_sklearn(..., options=...) with"
        " zipmap=False)"
    )


def _fields(
    model: bytes, session: ort.InferenceSession, golden_atol: float | None
) -> dict[str, Any]:
    problem = map_outputs_error({o.name: o.type for o in session.get_outputs()})
    if problem is not None:
        raise ModelCheckError(Reason.MODEL_INVALID, problem)
    contract = read_contract(session)
    described: dict[str, Any] = {
        "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
        "contract": contract.model_dump(mode="json"),
    }
    if golden_atol is not None:
        inputs, outputs = golden_sample(session, contract)
        described["golden"] = {
            "inputs": [_tensor_json(n, a) for n, a in inputs.items()],
            "outputs": [_tensor_json(n, a) for n, a in outputs.items()],
            "atol": golden_atol,
        }
    return described


def _replay_golden(model: bytes, golden: dict[str, Any]) -> None:
    try:
        parsed = Golden.model_validate_json(json.dumps(golden, allow_nan=True))
    except ValueError as e:
        raise ModelCheckError(Reason.GOLDEN_MISMATCH, f"golden sample is not valid: {e}") from e
    replay = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = golden_arrays(parsed.outputs)
    produced = replay.run(list(expected), golden_arrays(parsed.inputs))
    problems = golden_mismatches(expected, dict(zip(expected, produced, strict=True)), parsed.atol)
    if problems:
        raise ModelCheckError(Reason.GOLDEN_MISMATCH, "; ".join(problems))


def unsigned_manifest(
    described: dict[str, Any],
    *,
    name: str,
    version: int,
    url: str,
    created: datetime,
    valid_for: timedelta | None = None,
    contract_change: bool = False,
    baseline: dict[str, Any] | None = None,
) -> UnsignedManifest:
    """The manifest to sign, from :func:`describe_model`'s fields and where the bytes are.

    Raises :class:`ManifestRejected` (``schema_invalid``) naming the field a device would refuse.
    """
    unsigned: dict[str, Any] = {
        "name": name,
        "version": version,
        "url": url,
        "created": created.isoformat(),
        **described,
    }
    if valid_for is not None:
        unsigned["expires"] = (created + valid_for).isoformat()
    if contract_change:
        unsigned["contract_change"] = True
    if baseline is not None:
        unsigned["schema"] = 2  # the first manifest schema with a baseline (sha256, size, url)
        unsigned["baseline"] = baseline
    try:
        # Through JSON text, as a device reads it: strict JSON types, NaN refused.
        text = json.dumps(unsigned, allow_nan=False)
    except ValueError as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, f"not JSON: {e}") from e
    try:
        return UnsignedManifest.model_validate_json(text)
    except ValidationError as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, schema_message(e)) from e


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
    baseline: tuple[bytes, str] | None = None,
) -> dict[str, Any]:
    """A signed manifest for `model` served at `url` (no checks: tests sign bad models too);
    `baseline` is the drift baseline pack's bytes and the URL it is served at."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    unsigned = unsigned_manifest(
        _fields(model, session, golden_atol),
        name=name,
        version=version,
        url=url,
        created=created or datetime.now(UTC),
        valid_for=valid_for,
        contract_change=contract_change,
        baseline=(
            {
                "sha256": hashlib.sha256(baseline[0]).hexdigest(),
                "size": len(baseline[0]),
                "url": baseline[1],
            }
            if baseline is not None
            else None
        ),
    )
    return sign_manifest(unsigned, key, key_id)

"""Real ONNX models for agent tests, built once per session from
`deployment.examples.onnx_models`."""

from __future__ import annotations

import functools
import hashlib

from agent.serving.engine import LoadedModel, RuntimeOptions, load_model
from deployment.examples.onnx_models import mid_mlp, tiny_mlp

TINY_FEATURES = 32
MID_FEATURES = 1024


@functools.cache
def tiny_bytes(seed: int = 0) -> bytes:
    return bytes(tiny_mlp(seed).SerializeToString())


@functools.cache
def mid_bytes(seed: int = 0) -> bytes:
    return bytes(mid_mlp(seed).SerializeToString())


def loaded(data: bytes, *, name: str = "m", version: int = 1, max_rows: int = 32) -> LoadedModel:
    return load_model(
        data,
        name=name,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        options=RuntimeOptions(),
        max_rows=max_rows,
    )

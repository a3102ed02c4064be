"""What the module's end-to-end tests share: the tiny model's two releases and seeded rows."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np

from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.module_releases import Releases
from tests.support.service_sdk import Service

V1, V2 = tiny_bytes(0), tiny_bytes(1)


def tiny_rows(seed: int) -> np.ndarray:
    """One seeded row for the tiny model."""
    return np.random.default_rng(seed).standard_normal((1, TINY_FEATURES)).astype(np.float32)


def publish_v1(service: Service, releases: Releases) -> dict[str, Any]:
    """Release v1 of the tiny model and wait until the module serves it."""
    manifest = releases.release("v1.onnx", V1, 1)
    service.publish(manifest)
    service.wait_model(1)
    return manifest


def log_time(line: Mapping[str, Any]) -> float:
    """A JSON log line's timestamp, in seconds since the epoch."""
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()

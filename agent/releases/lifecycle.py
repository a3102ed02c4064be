"""Model lifecycle values: states, bounded reasons, status reports, probation. Pure.

A `ModelStatus` is what the device says about one model name: the module turns each one into
reported properties (and alerts for failures and rollbacks); the HTTP metadata shows it too.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import numpy as np

from agent.releases.manifest import Contract, Tensor
from agent.releases.manifest import TensorSpec as ManifestTensorSpec
from agent.serving.contract import V2_TO_NUMPY, ModelContract, TensorSpec


class ModelState(enum.StrEnum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    ACTIVE = "active"
    REJECTED = "rejected"  # the release itself is unacceptable: nothing was fetched or loaded
    FAILED = "failed"  # the release was acceptable but could not be installed
    ROLLED_BACK = "rolled_back"


class SwapReason(enum.StrEnum):
    """Why a release ended where it did. Bounded: safe as a metric label."""

    # rejected before any download
    SCHEMA_INVALID = "schema_invalid"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED = "expired"
    VERSION_NOT_MONOTONIC = "version_not_monotonic"
    URL_REJECTED = "url_rejected"
    # failed while installing
    FETCH_FAILED = "fetch_failed"
    TIMEOUT = "timeout"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"
    NOT_ONNX = "not_onnx"
    EXTERNAL_DATA = "external_data"
    MODEL_TOO_LARGE = "model_too_large"
    LOAD_FAILED = "load_failed"
    CONTRACT_MISMATCH = "contract_mismatch"
    GOLDEN_MISMATCH = "golden_mismatch"
    # rollbacks
    PROBATION_ERRORS = "probation_errors"
    PROBATION_LATENCY = "probation_latency"
    REQUESTED = "requested"
    NO_LAST_KNOWN_GOOD = "no_last_known_good"
    # start-up
    RESTORED = "restored"
    RESTORE_FAILED = "restore_failed"


class SwapError(Exception):
    """A release that ends in `state` for `reason`; the active model keeps serving."""

    def __init__(self, state: ModelState, reason: SwapReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.state = state
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """The reported state of one model name (the `model` section of the reported twin)."""

    name: str
    version: int | None
    sha256: str | None
    state: ModelState
    reason: SwapReason | None
    message: str
    since: datetime
    active_version: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "state": self.state.value,
            "reason": self.reason.value if self.reason else None,
            "message": self.message,
            "since": self.since.isoformat(),
            "active_version": self.active_version,
        }


def contract_from_manifest(contract: Contract) -> ModelContract:
    """The manifest's `{name, datatype, shape}` lists (-1 symbolic) as a `ModelContract`."""

    def specs(items: Iterable[ManifestTensorSpec]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                name=item.name,
                datatype=item.datatype,
                shape=tuple(None if dim < 0 else dim for dim in item.shape),
            )
            for item in items
        )

    return ModelContract(inputs=specs(contract.inputs), outputs=specs(contract.outputs))


def golden_arrays(tensors: Iterable[Tensor]) -> dict[str, np.ndarray]:
    """The manifest's golden tensors as numpy arrays of their declared datatypes."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.datatype == "BYTES":
            items = [d.encode() if isinstance(d, str) else d for d in tensor.data]
            arrays[tensor.name] = np.array(items, dtype=np.object_).reshape(tensor.shape)
        else:
            dtype = V2_TO_NUMPY[tensor.datatype]
            arrays[tensor.name] = np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
    return arrays


def golden_mismatches(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], atol: float
) -> list[str]:
    """What differs between the expected and the produced golden outputs (empty: a match)."""
    problems: list[str] = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"output {name!r} missing")
            continue
        if got.shape != want.shape:
            problems.append(f"output {name!r} shape {list(got.shape)}, expected {list(want.shape)}")
            continue
        if np.object_ in (want.dtype, got.dtype):
            if not np.array_equal(got, want):
                problems.append(f"output {name!r} differs")
            continue
        got_f = got.astype(np.float64)
        if not np.isfinite(got_f).all():
            problems.append(f"output {name!r} contains NaN or Inf")
            continue
        worst = float(np.max(np.abs(got_f - want.astype(np.float64)), initial=0.0))
        if worst > atol:
            problems.append(f"output {name!r} differs by {worst:.3g} > atol {atol:.3g}")
    return problems


@dataclass(frozen=True, slots=True)
class ProbationPolicy:
    """How long a new model is watched after a swap, and what rolls it back."""

    requests: int = 200
    seconds: float = 300.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0


@dataclass(frozen=True, slots=True)
class ServingStats:
    """Counters of one loaded model since it started serving."""

    served: int
    failed: int
    latency_total_s: float

    @property
    def mean_latency_s(self) -> float:
        return self.latency_total_s / self.served if self.served else math.nan


class Verdict(enum.Enum):
    WATCHING = "watching"
    PASSED = "passed"
    ERRORS = "errors"
    LATENCY = "latency"


NO_BASELINE: Final = ServingStats(0, 0, 0.0)


def judge_probation(
    candidate: ServingStats,
    previous: ServingStats,
    elapsed_s: float,
    policy: ProbationPolicy,
) -> Verdict:
    """Decide a probation from the new model's counters and the old model's for comparison.

    Errors are judged as soon as `min_requests` were served, so a broken model is caught
    early; latency only at the end, over the whole window, and only against an old model that
    itself served `min_requests` (a first install has nothing to regress from).
    """
    served = candidate.served
    if served >= policy.min_requests and candidate.failed / served > policy.max_error_rate:
        return Verdict.ERRORS
    if served < policy.requests and elapsed_s < policy.seconds:
        return Verdict.WATCHING
    if (
        served >= policy.min_requests
        and previous.served >= policy.min_requests
        and candidate.mean_latency_s > policy.max_latency_ratio * previous.mean_latency_s
    ):
        return Verdict.LATENCY
    return Verdict.PASSED

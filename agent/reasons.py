"""The agent's one vocabulary of failure reasons, and the error that carries one. Pure.

A reason is bounded: it is a metric label, a reported twin value and an alert field, so a
hostile input can never mint a new one. `message` is for people and may name the input.
Reasons only HTTP can produce (routing) live with HTTP (`agent.serving.http.HttpReason`).
"""

from __future__ import annotations

import enum
from typing import Final


class Reason(enum.StrEnum):
    # -- a release refused before anything is fetched (state `rejected`) ----------------
    SCHEMA_INVALID = "schema_invalid"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED = "expired"
    VERSION_NOT_MONOTONIC = "version_not_monotonic"
    URL_REJECTED = "url_rejected"
    NAME_MISMATCH = "name_mismatch"
    TOO_MANY_MODELS = "too_many_models"
    DESIRED_INVALID = "desired_invalid"
    # -- a release that could not be installed (state `failed`) ------------------------
    FETCH_FAILED = "fetch_failed"
    TIMEOUT = "timeout"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"
    NOT_ONNX = "not_onnx"
    EXTERNAL_DATA = "external_data"
    MODEL_TOO_LARGE = "model_too_large"
    MODEL_TOO_DEEP = "model_too_deep"
    LOAD_FAILED = "load_failed"
    CONTRACT_MISMATCH = "contract_mismatch"
    GOLDEN_MISMATCH = "golden_mismatch"
    RESOURCE_LIMIT = "resource_limit"  # killed or out of memory in quarantine
    LOAD_TIMEOUT = "load_timeout"  # out of CPU or wall time in quarantine
    CRASHED_DURING_INSTALL = "crashed_during_install"  # the agent died loading or trying it
    BASELINE_INVALID = "baseline_invalid"  # the drift baseline pack is not usable
    # -- rollbacks ---------------------------------------------------------------------
    PROBATION_ERRORS = "probation_errors"
    PROBATION_LATENCY = "probation_latency"
    REQUESTED = "requested"
    NO_LAST_KNOWN_GOOD = "no_last_known_good"
    # -- start-up ----------------------------------------------------------------------
    RESTORED = "restored"
    RESTORE_FAILED = "restore_failed"
    # -- an inference request refused ---------------------------------------------------
    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    BAD_DATATYPE = "bad_datatype"
    SHAPE_DATA_MISMATCH = "shape_data_mismatch"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_INPUT = "unknown_input"
    MISSING_INPUT = "missing_input"
    UNKNOWN_OUTPUT = "unknown_output"
    DTYPE_MISMATCH = "dtype_mismatch"
    RANK_MISMATCH = "rank_mismatch"
    DIM_MISMATCH = "dim_mismatch"
    TOO_LARGE = "too_large"
    NON_FINITE = "non_finite"
    NOT_READY = "not_ready"
    # The model answered NaN or Inf for this input (finite inputs can overflow: x*x on 3e38).
    NON_FINITE_OUTPUT = "non_finite_output"
    # -- a request the model accepted but failed on (ours to fix) ------------------------
    INFERENCE_FAILED = "inference_failed"


# A release ending for one of these was never acceptable (`rejected`); any other install
# failure is `failed`.
REJECTING: Final = frozenset(
    {
        Reason.SCHEMA_INVALID,
        Reason.SIGNATURE_MISSING,
        Reason.SIGNATURE_INVALID,
        Reason.UNKNOWN_KEY,
        Reason.EXPIRED,
        Reason.VERSION_NOT_MONOTONIC,
        Reason.URL_REJECTED,
        Reason.NAME_MISMATCH,
        Reason.TOO_MANY_MODELS,
        Reason.DESIRED_INVALID,
    }
)

# The reasons an inference request can be refused for (a metric series each from the start).
REQUEST_REASONS: Final = (
    Reason.BAD_JSON,
    Reason.BAD_REQUEST,
    Reason.BAD_DATATYPE,
    Reason.SHAPE_DATA_MISMATCH,
    Reason.UNKNOWN_MODEL,
    Reason.UNKNOWN_INPUT,
    Reason.MISSING_INPUT,
    Reason.UNKNOWN_OUTPUT,
    Reason.DTYPE_MISMATCH,
    Reason.RANK_MISMATCH,
    Reason.DIM_MISMATCH,
    Reason.TOO_LARGE,
    Reason.NON_FINITE,
    Reason.NOT_READY,
    Reason.NON_FINITE_OUTPUT,
)


class AgentError(Exception):
    """An expected failure: a bounded `reason` to branch on and report, a `message` for people.

    Subclasses say where it happened (a request, a manifest, a download, the store...); what
    the agent does about it depends on the reason alone.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

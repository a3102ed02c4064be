"""The one vocabulary of failure reasons, device and cloud, and the errors that carry one. Pure.

A reason is bounded: it is a metric label, a reported twin value, an alert field and a
publisher's exit reason, so a hostile input can never mint a new one. `message` is for people
and may name the input. Where the device and the cloud mean the same thing they share one
value, spelt as the device reports it (fielded twins carry those spellings). Reasons only HTTP
can produce (routing) live with HTTP (`agent.serving.http.HttpReason`).
"""

from __future__ import annotations

import enum
from typing import Final


class Reason(enum.StrEnum):
    # -- a release refused before anything is fetched (state `rejected`) ----------------
    # A document that does not have its schema's shape: on the device a release manifest; on
    # the cloud also a deployment template or a manifest IoT Hub refuses.
    SCHEMA_INVALID = "schema_invalid"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED = "expired"
    # Also the registry's refusal of a version that is not above the highest registered.
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
    GOLDEN_MISMATCH = "golden_mismatch"  # also the publisher's check of the golden sample
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
    # -- the cloud side only: why a publisher command cannot go on ------------------------
    # (the CLI prints it, the audit log records it; no device ever reports one of these)
    USAGE = "usage"
    CONFIG = "config"
    SECRET_MISSING = "secret_missing"  # noqa: S105 -- a reason, not a secret
    MODEL_INVALID = "model_invalid"
    NOT_FOUND = "not_found"
    UNREACHABLE = "unreachable"
    LOCKED = "locked"  # another process holds it: a controller's work folder, a database
    READ_ONLY = "read_only"
    INSECURE_URL = "insecure_url"
    UPLOAD_FAILED = "upload_failed"
    SAS_EXPIRED = "sas_expired"
    KEY_INVALID = "key_invalid"
    NO_DEVICES = "no_devices"
    GATE_FAILED = "gate_failed"
    GATE_TIMEOUT = "gate_timeout"
    HALTED = "halted"
    AUDIT_BROKEN = "audit_broken"
    NOT_AUDITED = "not_audited"  # the action was done; its audit entry could not be written
    PROFILE_INVALID = "profile_invalid"  # a drift profile record the report cannot read
    PIPELINE_FAILED = "pipeline_failed"


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


class ReasonedError(Exception):
    """An expected failure: a bounded `reason` to branch on and report, a `message` for people.

    The one base of the device's `AgentError` and the cloud's `PublisherError`.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class AgentError(ReasonedError):
    """A failure on the device.

    Subclasses say where it happened (a request, a manifest, a download, the store...); what
    the agent does about it depends on the reason alone.
    """

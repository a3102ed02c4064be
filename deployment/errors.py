"""One error type for the publisher: a bounded reason for scripts, a message for people."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a publisher command failed (the CLI prints it; the audit log records it)."""

    USAGE = "usage"
    CONFIG = "config"
    SECRET_MISSING = "secret_missing"  # noqa: S105 -- a reason, not a secret
    MODEL_INVALID = "model_invalid"
    GOLDEN_MISMATCH = "golden_mismatch"
    VERSION_NOT_NEWER = "version_not_newer"
    NOT_FOUND = "not_found"
    UNREACHABLE = "unreachable"
    UPLOAD_FAILED = "upload_failed"
    SAS_EXPIRED = "sas_expired"
    KEY_INVALID = "key_invalid"
    NO_DEVICES = "no_devices"
    GATE_FAILED = "gate_failed"
    GATE_TIMEOUT = "gate_timeout"
    HALTED = "halted"
    AUDIT_BROKEN = "audit_broken"
    MANIFEST_INVALID = "manifest_invalid"
    PIPELINE_FAILED = "pipeline_failed"
    PROFILE_INVALID = "profile_invalid"  # a drift profile record the report cannot read
    BASELINE_INVALID = "baseline_invalid"  # a drift baseline pack the report cannot use


class PublisherError(Exception):
    """A command that cannot go on; ``message`` names exactly what was wrong."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

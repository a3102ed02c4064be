"""Typed settings from `EDGEML_*` environment variables; command-line flags override them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.releases.download import DownloadPolicy
from agent.releases.lifecycle import ProbationPolicy
from agent.releases.swap import SwapSettings
from agent.serving.contract import RequestLimits
from agent.serving.engine import GraphOptimization, RuntimeOptions
from agent.serving.inference import BatchingPolicy

ENV_PREFIX = "EDGEML_"


class AgentSettings(BaseModel):
    """Every knob of the agent, each read from `EDGEML_<NAME>` by `from_environment`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path | None = Field(None, description="ONNX file served standalone (no hub).")
    model_name: str | None = Field(None, description="Served name; defaults to the file stem.")
    host: str = "0.0.0.0"  # noqa: S104 - a container's port must be reachable from outside it
    http_port: int = Field(8000, ge=0, le=65535)
    metrics_port: int = Field(9600, ge=0, le=65535)

    intra_op_threads: int = Field(1, ge=1, le=64)
    inter_op_threads: int = Field(1, ge=1, le=64)
    graph_optimization: GraphOptimization = "all"

    batching: bool = True
    max_batch: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    inline_budget_us: float = Field(1500.0, ge=0.0, le=1_000_000.0)
    busy_inline_budget_us: float = Field(200.0, ge=0.0, le=1_000_000.0)
    coalesce_above_us: float = Field(100.0, ge=0.0, le=1_000_000.0)
    worker_threads: int = Field(1, ge=1, le=64)

    max_request_bytes: int = Field(64 << 20, ge=1024)
    max_request_elements: int = Field(1 << 22, ge=1)
    allow_non_finite: bool = False

    state_dir: Path = Field(
        Path("/var/lib/edge-agent"), description="Model store volume: artifacts and state.json."
    )
    watch_dir: Path | None = Field(None, description="Folder of signed manifests + artifacts.")
    watch_debounce_s: float = Field(0.5, gt=0.0, le=60.0)
    trusted_keys: str = Field("", description="Manifest signing keys: 'key_id=BASE64,...'.")
    trusted_keys_dir: Path | None = Field(None, description="Folder of <key_id>.pem keys.")
    allowed_hosts: str = Field(
        "*.blob.core.windows.net", description="Artifact hosts, comma-separated, '*.suffix' ok."
    )
    allow_http_hosts: str = Field("", description="Hosts reachable over plain http (labs only).")
    artifact_ca_file: Path | None = Field(None, description="Extra CA bundle for artifact TLS.")
    download_deadline_s: float = Field(1800.0, gt=0.0)
    download_min_bytes_per_s: float = Field(1024.0, ge=0.0)
    keep_old_artifacts: int = Field(3, ge=0, le=100)
    max_model_bytes: int = Field(512 << 20, ge=1024)
    probation_requests: int = Field(200, ge=0)
    probation_seconds: float = Field(300.0, ge=0.0)
    probation_max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    probation_max_latency_ratio: float = Field(3.0, ge=1.0)

    shutdown_grace_s: float = Field(8.0, gt=0.0, le=60.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        also_known: frozenset[str] = frozenset(),
        **overrides: object,
    ) -> AgentSettings:
        """Settings from `environ`; a misspelt `EDGEML_*` name is an error, not a silent default.

        `also_known` names variables of the same prefix that an adapter reads itself.
        """
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields} | also_known
        unknown = sorted(
            k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
        )
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]}; known: {', '.join(sorted(known))}")
        values: dict[str, object] = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in environ
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            optimization=self.graph_optimization,
        )

    def batching_policy(self) -> BatchingPolicy:
        return BatchingPolicy(
            enabled=self.batching,
            max_rows=self.max_batch,
            max_wait_s=self.max_wait_ms / 1000,
            inline_budget_s=self.inline_budget_us / 1e6,
            busy_inline_budget_s=self.busy_inline_budget_us / 1e6,
            coalesce_above_s=self.coalesce_above_us / 1e6,
            worker_threads=self.worker_threads,
        )

    def download_policy(self) -> DownloadPolicy:
        return DownloadPolicy(
            allowed_hosts=_names(self.allowed_hosts),
            allow_http_hosts=_names(self.allow_http_hosts),
            deadline_s=self.download_deadline_s,
            min_bytes_per_s=self.download_min_bytes_per_s,
        )

    def swap_settings(self) -> SwapSettings:
        return SwapSettings(
            runtime=self.runtime_options(),
            max_rows=self.max_batch,
            max_model_bytes=self.max_model_bytes,
            probation=ProbationPolicy(
                requests=self.probation_requests,
                seconds=self.probation_seconds,
                max_error_rate=self.probation_max_error_rate,
                max_latency_ratio=self.probation_max_latency_ratio,
            ),
        )

    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_elements=self.max_request_elements, allow_non_finite=self.allow_non_finite
        )


def _names(listing: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in listing.split(",") if name.strip())

"""Settings of the IoT Edge adapter, from `EDGEML_MODULE_*` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "EDGEML_MODULE_"


class ModuleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    call_timeout_s: float = Field(30.0, gt=0.0, le=600.0, description="Every SDK call's limit.")
    offline_budget_s: float = Field(
        900.0, gt=0.0, description="Exit non-zero after this long without the hub."
    )
    max_route_in_flight: int = Field(256, ge=1, description="Route messages inferred at once.")
    max_queued_messages: int = Field(4096, ge=1, description="Route messages waiting.")
    max_input_bytes: int = Field(16 << 20, ge=1024, description="Decoded tensors per message.")
    spool_dir: Path | None = Field(None, description="Telemetry spool; default STATE_DIR/spool.")
    memory_headroom_alert_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Alert when memory left under the limit is below this."
    )
    memory_check_interval_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="How often headroom is checked against the limit."
    )

    @classmethod
    def environment_names(cls) -> frozenset[str]:
        return frozenset(PREFIX + name.upper() for name in cls.model_fields)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ModuleSettings:
        values = {
            name: environ[PREFIX + name.upper()]
            for name in cls.model_fields
            if PREFIX + name.upper() in environ
        }
        return cls.model_validate(values)

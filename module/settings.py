"""Settings of the IoT Edge adapter (`EDGEML_MODULE_*`), and the module process's composition."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.config import Section
from agent.settings import AgentSettings


class ModuleSettings(Section):
    env_prefix = "module_"

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
    # Each desired model is a signed manifest of up to 32 KB in one 32 KB twin section: a
    # handful fit; the bound keeps the reported patch small too.
    max_models: int = Field(8, ge=1, le=32, description="Models in desired `models`.")


class ModuleProcessSettings(Section):
    """`python -m module`: the agent's settings plus the adapter's, from one environment."""

    agent: AgentSettings = AgentSettings()
    module: ModuleSettings = ModuleSettings()

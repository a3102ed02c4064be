"""The agent's settings: the sections its components own, composed; read from `EDGEML_*`.

Each section lives with the component that uses it (`BatchingPolicy` in serving.inference,
`ProbationPolicy` in releases.lifecycle...) and is handed to it as is. The variable of every
field is `EDGEML_<NAME>`; command-line flags override them (`agent.config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from agent.config import Section
from agent.releases.download import DownloadPolicy
from agent.releases.folder import FolderSettings
from agent.releases.lifecycle import ProbationPolicy
from agent.releases.manifest import KeySettings
from agent.releases.store import StoreSettings
from agent.releases.swap import SwapSettings
from agent.serving.contract import RequestLimits
from agent.serving.engine import RuntimeOptions
from agent.serving.http import HttpSettings
from agent.serving.inference import BatchingPolicy


class LogSettings(Section):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"


class AgentSettings(Section):
    """Every knob of the agent (`python -m agent serve`; the module adds its own section)."""

    model_path: Path | None = Field(None, description="ONNX file served standalone (no hub).")
    model_name: str | None = Field(None, description="Served name; defaults to the file stem.")
    # Docker sends SIGKILL 10 s after SIGTERM: the default stays inside that.
    shutdown_grace_s: float = Field(8.0, gt=0.0, le=60.0)

    log: LogSettings = LogSettings()
    http: HttpSettings = HttpSettings()
    runtime: RuntimeOptions = RuntimeOptions()
    batching: BatchingPolicy = BatchingPolicy()
    limits: RequestLimits = RequestLimits()
    store: StoreSettings = StoreSettings()
    keys: KeySettings = KeySettings()
    download: DownloadPolicy = DownloadPolicy()
    swap: SwapSettings = SwapSettings()
    probation: ProbationPolicy = ProbationPolicy()
    folder: FolderSettings = FolderSettings()

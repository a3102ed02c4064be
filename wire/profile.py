"""`profile.json`: what the offline profiler measured and recommends (schema `agent-profile/1`).

Two views of one document. :class:`Profile` is the whole of it, closed, as the profiler writes
it. :class:`ProfileDocument` is what a deployment reads back (the recommendation); it passes
over the other fields, which are for people and which a newer profiler may extend, so a
publisher does not refuse a profile for a field it has no use for.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from wire.base import WireModel

__all__ = [
    "SCHEMA",
    "Configuration",
    "CreateOptions",
    "CreateOptionsDocument",
    "Host",
    "HostConfig",
    "HostConfigDocument",
    "HostLimits",
    "Knobs",
    "Plan",
    "Point",
    "Predicted",
    "Profile",
    "ProfileDocument",
    "ProfiledFile",
    "Recommendation",
    "RecommendationDocument",
    "Swap",
    "Target",
]

SCHEMA: Final = "agent-profile/1"
Schema = Literal["agent-profile/1"]


# -- the document as written --------------------------------------------------------------


class ProfiledFile(WireModel):
    file: str
    sha256: str
    size: int = Field(alias="bytes")


class Target(WireModel):
    rps: float
    max_p99_ms: float
    memory_headroom: float
    cpu_headroom: float


class HostConfig(WireModel):
    """Docker's own spelling, as a deployment manifest's `createOptions` has it."""

    Memory: int = Field(gt=0)
    NanoCpus: int = Field(gt=0)


class CreateOptions(WireModel):
    HostConfig: HostConfig


class Predicted(WireModel):
    p99_ms: float | None
    swap_window_p99_ms: float | None
    swap_window_s: float | None
    peak_rss_bytes: int
    steady_rss_bytes: int
    swap_transient_bytes: int
    cpu_cores: float


class Recommendation(WireModel):
    """What a deployment takes: the module's `EDGEML_*` settings and its `createOptions`."""

    met: bool
    why: str
    settings: dict[str, str]
    createOptions: CreateOptions  # noqa: N815 - Docker's own spelling, as the manifest has it
    predicted: Predicted


class Knobs(WireModel):
    intra_op_threads: int
    max_batch: int
    worker_threads: int
    batching: bool


class Point(WireModel):
    offered_rps: float
    achieved_rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    cpu_cores: float
    peak_rss_bytes: int
    batch_rows_mean: float | None


class Swap(WireModel):
    rss_before_bytes: int
    peak_rss_bytes: int
    rss_after_bytes: int
    seconds: float
    p99_ms: float | None
    window_s: float


class Configuration(WireModel):
    knobs: Knobs
    settings: dict[str, str]
    verdict: str
    error: str | None
    load_rss_bytes: int
    points: tuple[Point, ...]
    swap: Swap | None


class HostLimits(WireModel):
    cgroup: str
    memory_limit_bytes: int | None
    cpu_quota_cores: float | None
    cpus_allowed: int
    cpus: float


class Host(WireModel):
    limits: HostLimits
    python: str
    onnxruntime: str
    profiled: str  # RFC 3339, to the second


class Plan(WireModel):
    loads_rps: tuple[float, ...]
    warmup_s: float
    measure_s: float
    swap_rps: float | None
    load: str


class Profile(WireModel):
    """The whole `profile.json`, as the profiler writes it."""

    schema_: Schema = Field(alias="schema")
    model: ProfiledFile
    target: Target
    recommendation: Recommendation
    configurations: tuple[Configuration, ...]
    host: Host
    plan: Plan

    def document(self) -> dict[str, Any]:
        """The JSON document, with the field names it is written under."""
        return self.model_dump(mode="json", by_alias=True)


# -- the document as a deployment reads it -------------------------------------------------


class _Reading(BaseModel):
    # Strict and frozen like every wire type, but open: fields for people are passed over.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class HostConfigDocument(_Reading):
    Memory: int = Field(gt=0)
    NanoCpus: int = Field(gt=0)


class CreateOptionsDocument(_Reading):
    HostConfig: HostConfigDocument


class RecommendationDocument(_Reading):
    met: bool
    why: str
    settings: dict[str, str]
    createOptions: CreateOptionsDocument  # noqa: N815 - Docker's own spelling


class ProfileDocument(_Reading):
    """The parts of `profile.json` a deployment uses; other fields are for people."""

    schema_: Schema = Field(alias="schema")
    recommendation: RecommendationDocument

"""`profile.json`: the sweep's measurements and recommendation written as a `wire.profile`
document, a person's summary of it, and reading one back for a deployment."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import onnxruntime as ort
from pydantic import ValidationError

from agent.observation.limits import Limits
from agent.observation.recommend import ConfigRun, Recommendation, Target, recommend, verdict
from agent.profiler.plan import SweepPlan
from agent.settings import AgentSettings
from wire import profile as doc
from wire.bounded_json import BoundedJsonError, JsonLimits, check_bounds
from wire.profile import SCHEMA, ProfileDocument

__all__ = [
    "SCHEMA",
    "ProfileDocument",
    "ProfiledModel",
    "read_profile",
    "recommendation_document",
    "report",
    "summary_lines",
]


@dataclass(frozen=True, slots=True)
class ProfiledModel:
    file: str
    data: bytes = field(repr=False)


def report(
    model: ProfiledModel,
    runs: Sequence[ConfigRun],
    target: Target,
    *,
    limits: Limits,
    plan: SweepPlan,
) -> doc.Profile:
    """The `profile.json` document (schema `agent-profile/1`)."""
    best = recommend(runs, target, host_cpus=limits.cpus)
    return doc.Profile(
        schema=SCHEMA,
        model=doc.ProfiledFile(
            file=model.file,
            sha256=hashlib.sha256(model.data).hexdigest(),
            bytes=len(model.data),
        ),
        target=doc.Target(**asdict(target)),
        recommendation=recommendation_document(best),
        configurations=tuple(_configuration(run, target) for run in runs),
        host=doc.Host(
            limits=doc.HostLimits.model_validate(limits.as_json()),
            python=platform.python_version(),
            onnxruntime=ort.__version__,
            profiled=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
        plan=doc.Plan(
            loads_rps=tuple(plan.loads_rps),
            warmup_s=plan.warmup_s,
            measure_s=plan.measure_s,
            swap_rps=plan.swap_rps,
            load="open loop, v2 REST JSON, batch-1 requests, client on the same machine",
        ),
    )


def recommendation_document(best: Recommendation) -> doc.Recommendation:
    """What a deployment takes: the module's `EDGEML_*` settings and its `createOptions`."""
    return doc.Recommendation(
        met=best.met,
        why=best.why,
        settings=best.knobs.environment(),
        createOptions=doc.CreateOptions(
            HostConfig=doc.HostConfig(Memory=best.memory_limit_bytes, NanoCpus=best.nano_cpus)
        ),
        predicted=doc.Predicted(
            p99_ms=best.predicted_p99_ms,
            swap_window_p99_ms=best.predicted_swap_p99_ms,
            swap_window_s=best.swap_window_s,
            peak_rss_bytes=best.predicted_peak_rss_bytes,
            steady_rss_bytes=best.steady_rss_bytes,
            swap_transient_bytes=best.swap_transient_bytes,
            cpu_cores=best.predicted_cpu_cores,
        ),
    )


def _configuration(run: ConfigRun, target: Target) -> doc.Configuration:
    return doc.Configuration(
        knobs=doc.Knobs(**asdict(run.knobs)),
        settings=run.knobs.environment(),
        verdict=verdict(run, target) or "meets the target",
        error=run.error,
        load_rss_bytes=run.load_rss_bytes,
        points=tuple(doc.Point(**asdict(point)) for point in run.points),
        swap=None if run.swap is None else doc.Swap(**asdict(run.swap)),
    )


def summary_lines(document: doc.Profile) -> list[str]:
    """A person's reading of a profile document."""
    lines = []
    for run in document.configurations:
        label = " ".join(f"{k}={v}" for k, v in run.knobs.model_dump().items())
        lines.append(f"{label}: {run.verdict}")
        lines.extend(
            f"    {p.offered_rps:>8g}/s offered  {p.achieved_rps:>8g}/s achieved  "
            f"p50 {p.p50_ms} ms  p99 {p.p99_ms} ms  cpu {p.cpu_cores:g}  "
            f"peak {p.peak_rss_bytes / 2**20:.1f} MiB  errors {p.errors}"
            for p in run.points
        )
    best = document.recommendation
    host = best.createOptions.HostConfig
    lines += [
        "",
        f"recommendation ({best.why}):",
        *(f"    {name}={value}" for name, value in best.settings.items()),
        f"    HostConfig.Memory={host.Memory} ({host.Memory / 2**20:.0f} MiB)",
        f"    HostConfig.NanoCpus={host.NanoCpus} ({host.NanoCpus / 1e9:g} CPUs)",
        f"    predicted p99 {best.predicted.p99_ms} ms, "
        f"peak {best.predicted.peak_rss_bytes / 2**20:.1f} MiB",
    ]
    return lines


# -- reading profile.json back (the publisher renders createOptions from it) ------------


def read_profile(text: str | bytes) -> ProfileDocument:
    """`profile.json` parsed and checked; ValueError naming what is wrong."""
    # A page of numbers for people and the recommendation a deployment reads: small, shallow.
    limits = JsonLimits(max_bytes=1024 * 1024, max_depth=16)
    try:
        document = ProfileDocument.model_validate_json(check_bounds(text, limits))
    except BoundedJsonError as error:
        raise ValueError(f"profile.json: {error.problem}: {error.message}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"profile.json: {where}: {first['msg']}") from None
    _check_settings(document.recommendation.settings)
    return document


def _check_settings(settings: dict[str, str]) -> None:
    # They become the module's environment, where an unknown EDGEML_* name stops the agent.
    known = AgentSettings.environment_names()
    strangers = sorted(name for name in settings if name not in known)
    if strangers:
        raise ValueError(
            "profile.json: recommendation.settings: settings must be the agent's EDGEML_* "
            f"variables, not {strangers[0]}"
        )

"""Ring rollout through IoT Edge layered deployments, gated on what devices report.

Each ring is a device-tag condition. A ring step writes one layered deployment (an IoT Hub
configuration) whose only content is ``properties.desired.models.<name>`` of the agent module:
the hub fans it out, so the publisher's calls grow with rings, not with devices. The gate then
reads the agents' reported ``models.<name>`` through one twin query per poll.

Who owns which twin path: the base deployment (``manifest`` command, priority 0) owns
``$edgeAgent``, ``$edgeHub`` and the agent's other desired properties (``telemetry``,
``drift``); each layered deployment written here owns ``properties.desired.models.<name>`` of
the agent module for one ring, and replaces it wholesale, so no merge patch ever mixes two
manifests. Earlier rings get a higher priority, so a device in both ``canary`` and ``all``
runs the canary's release while it is newer.

Everything a step does is in the audit log before the next step starts, so a second run after
a crash continues from there, and a finished release run again changes nothing.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from deployment.errors import PublisherError, Reason
from deployment.publish.audit import AuditLog, Entry
from deployment.publish.hub_client import Hub, LayeredDeployment

log = structlog.get_logger(__name__)

LABEL_MODEL = "edgeml-model"
LABEL_RING = "edgeml-ring"
LABEL_VERSION = "edgeml-version"
BASE_PRIORITY = 10
RING_PRIORITY_STEP = 10
FAILED_STATES = frozenset({"failed", "rejected", "rolled_back"})
NO_TRAFFIC = "passed_without_traffic"  # the agent's probation state for a window with no traffic
DRIFT_ALARM = "drift"
# Query paths cannot quote every character a model name may hold; these need no quoting.
_QUERYABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Ring:
    name: str
    condition: str
    priority: int


@dataclass(frozen=True)
class GateBounds:
    min_fraction: float = 1.0  # of the targeted devices that must pass
    max_error_rate: float = 0.05
    max_p99_ratio: float = 3.0
    timeout_s: float = 900.0
    poll_s: float = 5.0
    # A probation that ended without its minimum of requests (`passed_without_traffic`) shows
    # nothing about the release: refused unless the operator accepts it (`--allow-no-traffic`).
    allow_no_traffic: bool = False


def rings_from_config(conditions: Mapping[str, str]) -> list[Ring]:
    """Rings in config order; earlier rings win on devices that several rings target."""
    count = len(conditions)
    return [
        Ring(name, condition, BASE_PRIORITY + RING_PRIORITY_STEP * (count - index))
        for index, (name, condition) in enumerate(conditions.items())
    ]


def select_rings(available: Sequence[Ring], requested: Sequence[str]) -> list[Ring]:
    by_name = {ring.name: ring for ring in available}
    unknown = [name for name in requested if name not in by_name]
    if unknown:
        raise PublisherError(
            Reason.USAGE,
            f"unknown ring(s) {', '.join(unknown)} (configured: {', '.join(by_name) or 'none'})",
        )
    if len(set(requested)) != len(requested):
        raise PublisherError(Reason.USAGE, "a ring is named twice in --rings")
    return [by_name[name] for name in requested]


def check_model_name(name: str) -> None:
    if not _QUERYABLE_NAME.fullmatch(name):
        raise PublisherError(
            Reason.USAGE,
            f"model name {name!r} cannot be released through twin queries: "
            "use a letter then letters, digits or _",
        )


def config_id(model: str, ring: str, version: int, manifest: Mapping[str, Any]) -> str:
    """Deterministic, so a repeated step finds the configuration it already made.

    IoT Hub never changes a configuration's content, so a re-signed manifest (a refreshed SAS
    URL) needs a new id: the id ends with a digest of the signature.
    """
    return f"edgeml-{model.lower().replace('_', '-')}-{ring}-v{version}-{manifest_digest(manifest)}"


def desired_path(model: str) -> str:
    return f"properties.desired.models.{model}"


def metric_queries(module: str, model: str, version: int) -> dict[str, str]:
    """The configuration's custom metrics, shown by ``status`` and the hub's portal."""
    where = (
        # A twin query, not SQL: the module and model names were checked against patterns.
        f"SELECT deviceId FROM devices.modules WHERE moduleId = '{module}' "  # noqa: S608
        f"AND properties.reported.models.{model}.version = {version}"
    )
    return {
        "reported": where,
        "passed": f"{where} AND properties.reported.models.{model}.probation.state = 'passed'",
        "failed": f"{where} AND properties.reported.models.{model}.state IN "
        "['failed', 'rejected', 'rolled_back']",
    }


def layered_deployment(
    model: str,
    ring: Ring,
    version: int,
    manifest: Mapping[str, Any],
    module: str,
    *,
    ring_variable: tuple[str, str] | None = None,
) -> LayeredDeployment:
    content: dict[str, dict[str, Any]] = {module: {desired_path(model): dict(manifest)}}
    if ring_variable is not None:
        # The ring's name as an environment variable of one module (the fleet monitoring's
        # Prometheus labels its series with it): every layer of a ring writes the same value.
        target, variable = ring_variable
        content["$edgeAgent"] = {
            f"properties.desired.modules.{target}.env.{variable}": {"value": ring.name}
        }
    return LayeredDeployment(
        id=config_id(model, ring.name, version, manifest),
        target_condition=ring.condition,
        priority=ring.priority,
        modules_content=content,
        labels={LABEL_MODEL: model, LABEL_RING: ring.name, LABEL_VERSION: str(version)},
        metric_queries=metric_queries(module, model, version),
    )


# ------------------------------------------------------------------------------ the gate


@dataclass(frozen=True)
class DeviceVerdict:
    device_id: str
    outcome: str  # passed | failed | pending
    reason: str = ""
    without_traffic: bool = False  # passed on a probation that saw no traffic (allowed)


def judge_device(
    device_id: str, reported: Mapping[str, Any] | None, version: int, bounds: GateBounds
) -> DeviceVerdict:
    """One agent's reported ``models.<name>`` against the release (pure)."""
    if not isinstance(reported, Mapping) or reported.get("version") != version:
        return DeviceVerdict(device_id, "pending", "not reporting this version yet")
    problem = _problem(reported, version, bounds)
    if problem:
        return DeviceVerdict(device_id, "failed", problem)
    state = reported.get("state")
    probation = _mapping(reported.get("probation"))
    if state == "active" and probation.get("state") == "passed":
        return DeviceVerdict(device_id, "passed")
    if state == "active" and probation.get("state") == NO_TRAFFIC:
        if bounds.allow_no_traffic:
            return DeviceVerdict(device_id, "passed", "saw no traffic", without_traffic=True)
        return DeviceVerdict(
            device_id,
            "failed",
            f"saw no traffic during probation ({probation.get('requests')} requests, "
            f"{NO_TRAFFIC}); release with --allow-no-traffic to accept that",
        )
    return DeviceVerdict(device_id, "pending", f"{state}, probation {probation.get('state')}")


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _over(value: object, bound: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > bound


def _problem(reported: Mapping[str, Any], version: int, bounds: GateBounds) -> str:
    """Why a device that reports the release fails the gate ('' when it does not)."""
    state = reported.get("state")
    probation = _mapping(reported.get("probation"))
    drift = _mapping(reported.get("drift"))
    checks = (
        (state in FAILED_STATES, f"{state}: {reported.get('reason', '')}"),
        (probation.get("state") == "failed", "probation failed"),
        (
            _over(probation.get("error_rate"), bounds.max_error_rate),
            f"error rate {probation.get('error_rate')}",
        ),
        (
            _over(probation.get("p99_ratio"), bounds.max_p99_ratio),
            f"p99 ratio {probation.get('p99_ratio')}",
        ),
        # Until the release serves, the drift section is the previous release's watch.
        (drift.get("version") == version and drift.get("state") == DRIFT_ALARM, "drift alarm"),
    )
    return next((why for failed, why in checks if failed), "")


@dataclass(frozen=True)
class GateResult:
    outcome: str  # passed | failed | waiting
    required: int
    passed: int
    failed: tuple[DeviceVerdict, ...] = ()
    pending: int = 0
    without_traffic: int = 0  # of `passed`: devices whose probation saw no traffic


def judge_gate(verdicts: Iterable[DeviceVerdict], required: int) -> GateResult:
    """Failed as soon as one device fails; passed once ``required`` devices passed (pure)."""
    items = list(verdicts)
    failed = tuple(v for v in items if v.outcome == "failed")
    passed = sum(1 for v in items if v.outcome == "passed")
    pending = sum(1 for v in items if v.outcome == "pending")
    quiet = sum(1 for v in items if v.outcome == "passed" and v.without_traffic)
    if failed:
        outcome = "failed"
    elif passed >= required:
        outcome = "passed"
    else:
        outcome = "waiting"
    return GateResult(outcome, required, passed, failed, pending, quiet)


def required_devices(targeted: int, min_fraction: float) -> int:
    return max(1, math.ceil(targeted * min_fraction - 1e-9)) if targeted else 0


def union(conditions: Iterable[str]) -> str:
    return " OR ".join(f"({c})" for c in conditions)


def module_models(twin: Mapping[str, Any], model: str) -> Mapping[str, Any] | None:
    reported = twin.get("properties", {}).get("reported", {})
    models = reported.get("models") if isinstance(reported, Mapping) else None
    entry = models.get(model) if isinstance(models, Mapping) else None
    return entry if isinstance(entry, Mapping) else None


# ------------------------------------------------------------------------------ progress


@dataclass
class Progress:
    """What the audit log says a release has done so far."""

    applied: set[str] = field(default_factory=set)
    gated: set[str] = field(default_factory=set)
    previous: dict[str, int | None] = field(default_factory=dict)
    halted: Entry | None = None
    finished: bool = False
    without_traffic: dict[str, int] = field(default_factory=dict)  # ring -> devices accepted


def progress_of(entries: Iterable[Entry], subject: str) -> Progress:
    """Replay the audit entries of one release (pure)."""
    progress = Progress()
    for entry in entries:
        if entry.subject != subject:
            continue
        ring = str(entry.details.get("ring", ""))
        if entry.action == "release.ring" and entry.outcome == "applied":
            progress.applied.add(ring)
            previous = entry.details.get("previous_version")
            progress.previous[ring] = int(previous) if previous is not None else None
        elif entry.action == "release.gate" and entry.outcome == "passed":
            progress.gated.add(ring)
            quiet = entry.details.get("without_traffic")
            if isinstance(quiet, int) and quiet > 0:
                progress.without_traffic[ring] = quiet
        elif entry.action == "release.halted":
            progress.halted = entry
        elif entry.action == "release.finished":
            progress.finished = True
    return progress


# ------------------------------------------------------------------------------ the rollout


@dataclass(frozen=True)
class PlannedRing:
    ring: Ring
    config_id: str
    devices: tuple[str, ...]
    done: bool


Rerelease = Callable[[str, int, int], tuple[int, Mapping[str, Any]]]
"""(model, bad version, previous version) -> (new version, its signed manifest)."""
SetAlias = Callable[[str, str, int], None]
AliasOf = Callable[[str, str], int | None]


class Rollout:
    def __init__(
        self,
        hub: Hub,
        audit: AuditLog,
        *,
        module: str,
        alias_of: AliasOf,
        set_alias: SetAlias,
        rerelease: Rerelease,
        ring_variable: tuple[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._hub = hub
        self._audit = audit
        self._module = module
        self._alias_of = alias_of
        self._set_alias = set_alias
        self._rerelease = rerelease
        self._ring_variable = ring_variable
        self._clock = clock
        self._sleep = sleep

    @staticmethod
    def devices_of(hub: Hub, condition: str) -> list[str]:
        return sorted(str(t["deviceId"]) for t in hub.query(_devices_query(condition)))

    def devices(self, condition: str) -> list[str]:
        return self.devices_of(self._hub, condition)

    def plan(
        self, model: str, version: int, manifest: Mapping[str, Any], rings: Sequence[Ring]
    ) -> list[PlannedRing]:
        progress = progress_of(self._audit.entries(), f"{model}:{version}")
        return [
            PlannedRing(
                ring,
                config_id(model, ring.name, version, manifest),
                tuple(self.devices(ring.condition)),
                ring.name in progress.gated,
            )
            for ring in rings
        ]

    def progress(self, model: str, version: int) -> Progress:
        """What the audit log says ``model:version`` has done so far."""
        return progress_of(self._audit.entries(), f"{model}:{version}")

    def release(
        self,
        model: str,
        version: int,
        manifest: Mapping[str, Any],
        rings: Sequence[Ring],
        bounds: GateBounds,
    ) -> str:
        """Roll ``model:version`` through ``rings``; returns ``released`` or ``unchanged``."""
        check_model_name(model)
        subject = f"{model}:{version}"
        progress = progress_of(self._audit.entries(), subject)
        if progress.halted is not None:
            raise PublisherError(
                Reason.HALTED,
                f"{subject} was halted at ring {progress.halted.details.get('ring')!r} "
                f"({progress.halted.details.get('why', '')}); release a newer version",
            )
        if progress.finished and all(r.name in progress.gated for r in rings):
            return "unchanged"
        for ring in rings:  # a condition that matches nothing is a typo, not a ring
            if not self.devices(ring.condition):
                raise PublisherError(
                    Reason.NO_DEVICES, f"ring {ring.name!r} ({ring.condition}) matches no device"
                )
        self._audit.append("release.start", subject, "started", rings=[r.name for r in rings])
        reached: list[Ring] = []
        for index, ring in enumerate(rings):
            reached.append(ring)
            if ring.name in progress.gated:
                continue
            try:
                if ring.name not in progress.applied:
                    previous = self._alias_of(model, ring.name)
                    self._apply(model, version, manifest, ring, previous)
                    progress.previous[ring.name] = previous
                cumulative = union(r.condition for r in rings[: index + 1])
                result = self._gate(model, version, ring, cumulative, bounds)
            except PublisherError as e:
                # The hub or the registry went away mid-step: say where, so a rerun resumes.
                self._audit.append(
                    "release.interrupted", subject, str(e.reason), ring=ring.name, why=e.message
                )
                raise
            if result.outcome != "passed":
                self._halt(model, version, ring, reached=reached, progress=progress, result=result)
            self._set_alias(model, ring.name, version)
        self._audit.append("release.finished", subject, "released", rings=[r.name for r in rings])
        return "released"

    def refresh(
        self, model: str, version: int, manifest: Mapping[str, Any], rings: Sequence[Ring]
    ) -> list[str]:
        """Re-point every ring whose layer carries ``model:version`` at a re-signed manifest."""
        carrying = {
            c.labels.get(LABEL_RING)
            for c in self._hub.configurations()
            if c.labels.get(LABEL_MODEL) == model and c.labels.get(LABEL_VERSION) == str(version)
        }
        refreshed = []
        for ring in rings:
            if ring.name in carrying:
                self._put_layer(model, ring, version, manifest)
                refreshed.append(ring.name)
        return refreshed

    def _apply(
        self,
        model: str,
        version: int,
        manifest: Mapping[str, Any],
        ring: Ring,
        previous: int | None,
    ) -> None:
        deployment, replaced = self._put_layer(model, ring, version, manifest)
        self._audit.append(
            "release.ring",
            f"{model}:{version}",
            "applied",
            ring=ring.name,
            configuration=deployment.id,
            priority=ring.priority,
            condition=ring.condition,
            previous_version=previous,
            replaced=replaced,
        )
        log.info("ring_applied", model=model, version=version, ring=ring.name, config=deployment.id)

    def _put_layer(
        self, model: str, ring: Ring, version: int, manifest: Mapping[str, Any]
    ) -> tuple[LayeredDeployment, list[str]]:
        """The ring's layer of ``model`` now carries ``manifest``: the new layer first, then the
        older ones go (never a moment without one); returns it and the ids it replaced."""
        deployment = layered_deployment(
            model, ring, version, manifest, self._module, ring_variable=self._ring_variable
        )
        self._hub.create_configuration(deployment)
        return deployment, self._replace_older(model, ring.name, deployment.id)

    def _replace_older(self, model: str, ring: str, keep: str) -> list[str]:
        """Delete this ring's older layers of the model: one writer per path and ring."""
        replaced = [
            c.id
            for c in self._hub.configurations()
            if c.labels.get(LABEL_MODEL) == model
            and c.labels.get(LABEL_RING) == ring
            and c.id != keep
        ]
        for old in replaced:
            self._hub.delete_configuration(old)
        return replaced

    def _gate(
        self, model: str, version: int, ring: Ring, cumulative: str, bounds: GateBounds
    ) -> GateResult:
        subject = f"{model}:{version}"
        targeted = self.devices(cumulative)
        required = required_devices(len(targeted), bounds.min_fraction)
        deadline = self._clock() + bounds.timeout_s
        wanted = set(targeted)
        while True:
            twins = self._hub.query(_reported_query(self._module, model, version))
            verdicts = [
                judge_device(str(t["deviceId"]), module_models(t, model), version, bounds)
                for t in twins
                if str(t.get("deviceId")) in wanted
            ]
            result = judge_gate(verdicts, required)
            if result.outcome != "waiting":
                break
            if self._clock() >= deadline:
                result = GateResult("timeout", required, result.passed, (), result.pending)
                break
            self._sleep(bounds.poll_s)
        self._audit.append(
            "release.gate",
            subject,
            result.outcome,
            ring=ring.name,
            required=result.required,
            passed=result.passed,
            without_traffic=result.without_traffic,
            failed={v.device_id: v.reason for v in result.failed},
        )
        log.info("gate", model=model, version=version, ring=ring.name, outcome=result.outcome)
        return result

    def _halt(
        self,
        model: str,
        version: int,
        ring: Ring,
        *,
        reached: Sequence[Ring],
        progress: Progress,
        result: GateResult,
    ) -> None:
        """Restore the previous release on every ring this release reached, then stop."""
        subject = f"{model}:{version}"
        why = (
            "gate timed out"
            if result.outcome == "timeout"
            else "; ".join(f"{v.device_id}: {v.reason}" for v in result.failed[:5])
        )
        self._audit.append("release.halted", subject, "halted", ring=ring.name, why=why)
        twins = self._hub.query(_reported_query(self._module, model, version))
        for twin in twins:
            device = str(twin["deviceId"])
            try:
                status, _ = self._hub.invoke(device, self._module, "rollback", {"model": model})
                outcome = str(status)
            except PublisherError as e:
                # An offline device converges through the re-released layer when it is back.
                outcome = str(e.reason)
            self._audit.append(
                "release.rollback_method", subject, outcome, device=device, ring=ring.name
            )
        # Rings that ran the same previous version get the same re-release: one registry
        # version and one signature for those bytes, not one per ring.
        rereleased: dict[int, tuple[int, Mapping[str, Any]]] = {}
        for touched in reached:
            previous = progress.previous.get(touched.name)
            if previous is None:
                removed = self._replace_older(model, touched.name, keep="")
                self._audit.append(
                    "release.rollback", subject, "removed", ring=touched.name, removed=removed
                )
                continue
            if previous not in rereleased:
                rereleased[previous] = self._rerelease(model, version, previous)
            new_version, manifest = rereleased[previous]
            deployment, _ = self._put_layer(model, touched, new_version, manifest)
            self._set_alias(model, touched.name, new_version)
            self._audit.append(
                "release.rollback",
                subject,
                "rereleased",
                ring=touched.name,
                restored_version=previous,
                as_version=new_version,
                configuration=deployment.id,
            )
        reason = Reason.GATE_TIMEOUT if result.outcome == "timeout" else Reason.GATE_FAILED
        raise PublisherError(reason, f"{subject} halted at ring {ring.name!r}: {why}")


def _devices_query(condition: str) -> str:
    # A twin query over the operator's own ring condition: the hub parses and validates it.
    return f"SELECT * FROM devices WHERE {condition}"  # noqa: S608


def _reported_query(module: str, model: str, version: int) -> str:
    return (
        f"SELECT * FROM devices.modules WHERE moduleId = '{module}' "  # noqa: S608 -- see above
        f"AND properties.reported.models.{model}.version = {version}"
    )


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    signature = manifest.get("signature", {})
    value = signature.get("value", "") if isinstance(signature, Mapping) else ""
    return hashlib.sha256(str(value).encode()).hexdigest()[:8]

"""Ring rollout through IoT Edge layered deployments, gated on what devices report.

Each ring is a device-tag condition. A ring step writes one layered deployment (an IoT Hub
configuration) whose only content is ``properties.desired.models.<name>`` of the agent module:
the hub fans it out, so the publisher's calls grow with rings, not with devices. The gate then
reads the agents' reported ``models.<name>`` through one twin query per poll and judges them
(:mod:`deployment.publish.gate`); where a release stands is replayed from the audit log
(:mod:`deployment.publish.journal`).

Who owns which twin path: the base deployment (``manifest`` command, priority 0) owns
``$edgeAgent``, ``$edgeHub`` and the agent's other desired properties (``telemetry``,
``drift``); each layered deployment written here owns ``properties.desired.models.<name>`` of
the agent module for one ring, and replaces it wholesale, so no merge patch ever mixes two
manifests. Earlier rings get a higher priority, so a device in both ``canary`` and ``all``
runs the canary's release while it is newer.

Everything a step does is in the audit log before the next step starts, so a second run after
a crash continues from there, and a finished release run again changes nothing.

A halt is journalled the same way: ``release.halt started`` (the decision, with every ring the
release reached and what each ran before), then each device's ``release.rollback_method``, the
``release.rerelease`` of each previous version, each ring's ``release.rollback`` (its layer
restored or removed), and ``release.halted`` only once all of it is done. A run killed or cut off
from the hub in between leaves a halt started and not finished; ``release`` run again (or
``status --repair``) finishes it from the journal instead of refusing the halted release.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from deployment.errors import PublisherError, Reason
from deployment.publish.audit import AuditLog, Entry
from deployment.publish.gate import (
    GateBounds,
    GateResult,
    ThrottledReport,
    failure_lines,
    gate_line,
    judge_device,
    judge_gate,
    required_devices,
)
from deployment.publish.hub_client import Hub, LayeredDeployment
from deployment.publish.journal import (
    Progress,
    check_newer_than_released,
    halting_subjects,
    progress_of,
    released_versions,
)

log = structlog.get_logger(__name__)

LABEL_MODEL = "edgeml-model"
LABEL_RING = "edgeml-ring"
LABEL_VERSION = "edgeml-version"
BASE_PRIORITY = 10
RING_PRIORITY_STEP = 10
# Query paths cannot quote every character a model name may hold; these need no quoting.
_QUERYABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Ring:
    name: str
    condition: str
    priority: int


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


def may_remove(label: str | None, version: int, *, own_only: bool) -> bool:
    """Whether a release of ``version`` may delete a layer labelled ``label`` (pure)."""
    if label is None or not label.isdigit():
        return False  # not a layer this publisher wrote
    return int(label) == version if own_only else int(label) <= version


def union(conditions: Iterable[str]) -> str:
    return " OR ".join(f"({c})" for c in conditions)


def module_models(twin: Mapping[str, Any], model: str) -> Mapping[str, Any] | None:
    reported = twin.get("properties", {}).get("reported", {})
    models = reported.get("models") if isinstance(reported, Mapping) else None
    entry = models.get(model) if isinstance(models, Mapping) else None
    return entry if isinstance(entry, Mapping) else None


# ------------------------------------------------------------------------------ the rollout


@dataclass(frozen=True)
class PlannedRing:
    ring: Ring
    config_id: str
    devices: tuple[str, ...]
    done: bool


Rerelease = Callable[[str, int, int], tuple[int, Mapping[str, Any]]]
"""(model, bad version, previous version) -> (new version, its signed manifest); called again
for the same three (a halt resumed), it returns the version it registered the first time."""
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
        report: Callable[[str], None] | None = None,
    ) -> None:
        self._hub = hub
        # What the operator watches while a gate waits; silent when nobody asked.
        self._report = report or (lambda _line: None)
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
        entries = list(self._audit.entries())
        check_newer_than_released(model, version, released_versions(entries, model))
        progress = progress_of(entries, f"{model}:{version}")
        # Done means the hub still carries this very layer: a re-signed manifest is a new id.
        present = {c.id for c in self._hub.configurations()}
        planned = []
        for ring in rings:
            layer = config_id(model, ring.name, version, manifest)
            done = ring.name in progress.gated and layer in present
            planned.append(PlannedRing(ring, layer, tuple(self.devices(ring.condition)), done))
        return planned

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
        entries = list(self._audit.entries())
        progress = progress_of(entries, subject)
        if progress.halting:
            self._finish_halt(model, version, progress, resumed=True)
            assert progress.halt is not None
            raise PublisherError(
                Reason.HALTED,
                f"{subject} was halted at ring {progress.halt.details.get('ring')!r} "
                f"({progress.halt.details.get('why', '')}); the halt a previous run left "
                "unfinished is finished now; release a newer version",
            )
        if progress.halted is not None:
            raise PublisherError(
                Reason.HALTED,
                f"{subject} was halted at ring {progress.halted.details.get('ring')!r} "
                f"({progress.halted.details.get('why', '')}); release a newer version",
            )
        # After the halts: a halted release is refused by name, and its own re-release is above it.
        check_newer_than_released(model, version, released_versions(entries, model))
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

    def repair(self) -> list[str]:
        """Finish every halt that a killed or cut-off run left unfinished; the subjects."""
        entries = list(self._audit.entries())
        finished = []
        for subject in halting_subjects(entries):
            model, _, version = subject.rpartition(":")
            self._finish_halt(model, int(version), progress_of(entries, subject), resumed=True)
            finished.append(subject)
        return finished

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
        return deployment, self._replace_older(model, ring.name, deployment.id, version=version)

    def _replace_older(
        self, model: str, ring: str, keep: str, *, version: int, own_only: bool = False
    ) -> list[str]:
        """Delete this ring's older layers of the model: one writer per path and ring.

        Never a layer another release owns: a newer version's layer stays, and a rollback
        (``own_only``) removes only layers labelled with its own version.
        """
        replaced = []
        for c in self._hub.configurations():
            if c.labels.get(LABEL_MODEL) != model or c.labels.get(LABEL_RING) != ring:
                continue
            if c.id == keep:
                continue
            if not may_remove(c.labels.get(LABEL_VERSION), version, own_only=own_only):
                log.warning("layer_kept", model=model, ring=ring, config=c.id, version=version)
                continue
            self._hub.delete_configuration(c.id)
            replaced.append(c.id)
        return replaced

    def _gate(
        self, model: str, version: int, ring: Ring, cumulative: str, bounds: GateBounds
    ) -> GateResult:
        subject = f"{model}:{version}"
        targeted = self.devices(cumulative)
        required = required_devices(len(targeted), bounds.min_fraction)
        deadline = self._clock() + bounds.timeout_s
        wanted = set(targeted)
        shown = ThrottledReport(self._report, self._clock)
        while True:
            twins = self._hub.query(_reported_query(self._module, model, version))
            reports = {
                str(t["deviceId"]): module_models(t, model)
                for t in twins
                if str(t.get("deviceId")) in wanted
            }
            verdicts = [
                judge_device(device, report, version, bounds) for device, report in reports.items()
            ]
            result = judge_gate(verdicts, required)
            line = gate_line(ring.name, len(targeted), version, reports.values(), result)
            shown.show(line, final=result.outcome != "waiting")
            if result.outcome != "waiting":
                for line in failure_lines(ring.name, result, reports):
                    self._report(line)
                break
            if self._clock() >= deadline:
                result = GateResult("timeout", required, result.passed, (), result.pending)
                self._report(
                    f"{ring.name}: timed out after {bounds.timeout_s:g} s, "
                    f"{result.passed}/{required} passed"
                )
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
        """Decide the halt (journalled first), restore every ring the release reached, stop."""
        subject = f"{model}:{version}"
        why = (
            "gate timed out"
            if result.outcome == "timeout"
            else "; ".join(f"{v.device_id}: {v.reason}" for v in result.failed[:5])
        )
        # Everything a rerun needs to finish the halt without the config or the first run.
        progress.halt = self._audit.append(
            "release.halt",
            subject,
            "started",
            ring=ring.name,
            why=why,
            gate=result.outcome,
            reached=[
                {
                    "ring": r.name,
                    "condition": r.condition,
                    "priority": r.priority,
                    "previous_version": progress.previous.get(r.name),
                }
                for r in reached
            ],
        )
        self._finish_halt(model, version, progress, resumed=False)
        reason = Reason.GATE_TIMEOUT if result.outcome == "timeout" else Reason.GATE_FAILED
        raise PublisherError(reason, f"{subject} halted at ring {ring.name!r}: {why}")

    def _finish_halt(self, model: str, version: int, progress: Progress, *, resumed: bool) -> None:
        """Every step of the decided halt that the journal does not show done, then
        ``release.halted``; a hub or registry error is ``release.interrupted`` like a ring's."""
        halt = progress.halt
        assert halt is not None
        subject = f"{model}:{version}"
        ring = str(halt.details.get("ring"))
        if resumed:
            self._audit.append("release.halt", subject, "resumed", ring=ring)
        try:
            self._rollback_methods(model, version, ring, progress)
            self._restore_rings(model, version, halt, progress)
        except PublisherError as e:
            self._audit.append(
                "release.interrupted",
                subject,
                str(e.reason),
                ring=ring,
                step="halt",
                why=e.message,
            )
            raise
        progress.halted = self._audit.append(
            "release.halted",
            subject,
            "halted",
            ring=ring,
            why=str(halt.details.get("why", "")),
            resumed=resumed,
        )
        log.info("halted", model=model, version=version, ring=ring, resumed=resumed)

    def _rollback_methods(self, model: str, version: int, ring: str, progress: Progress) -> None:
        """The ``rollback`` method on each device still reporting the release, once each."""
        subject = f"{model}:{version}"
        twins = self._hub.query(_reported_query(self._module, model, version))
        for twin in twins:
            device = str(twin["deviceId"])
            if device in progress.methods:
                continue  # asked by the run that was cut off: twice would go back further
            try:
                status, _ = self._hub.invoke(device, self._module, "rollback", {"model": model})
                outcome = str(status)
            except PublisherError as e:
                # An offline device converges through the re-released layer when it is back.
                outcome = str(e.reason)
            self._audit.append(
                "release.rollback_method", subject, outcome, device=device, ring=ring
            )
            progress.methods.add(device)

    def _restore_rings(self, model: str, version: int, halt: Entry, progress: Progress) -> None:
        subject = f"{model}:{version}"
        # Rings that ran the same previous version get the same re-release: one registry
        # version and one signature for those bytes, not one per ring.
        rereleased: dict[int, tuple[int, Mapping[str, Any]]] = {}
        for reached in halt.details.get("reached", []):
            touched = Ring(str(reached["ring"]), str(reached["condition"]), reached["priority"])
            if touched.name in progress.restored:
                continue
            previous = reached.get("previous_version")
            if previous is None:
                removed = self._replace_older(
                    model, touched.name, keep="", version=version, own_only=True
                )
                self._audit.append(
                    "release.rollback", subject, "removed", ring=touched.name, removed=removed
                )
                self._report(f"{touched.name}: removed the layer of v{version} (none before it)")
                progress.restored.add(touched.name)
                continue
            if previous not in rereleased:
                # Idempotent: a rerun gets the version the cut-off run registered, if any.
                rereleased[previous] = self._rerelease(model, version, previous)
                as_version = rereleased[previous][0]
                if progress.reregistered.get(previous) != as_version:
                    self._audit.append(
                        "release.rerelease",
                        subject,
                        "registered",
                        restored_version=previous,
                        as_version=as_version,
                    )
                    progress.reregistered[previous] = as_version
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
            self._report(
                f"{touched.name}: rolled back to v{previous}, re-released as v{new_version}"
            )
            progress.restored.add(touched.name)


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

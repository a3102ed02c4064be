"""The publisher's commands: each validates, acts, records itself in the audit log and prints.

Every outside thing comes in through `Services` (MLflow, Blob, the hub, the clock), made
lazily from the environment's config and secrets: a command that needs no hub never asks for
the hub's connection string, and a missing secret fails before anything is changed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from agent.observation.baseline import BASELINE_LIMITS
from agent.releases.manifest import ManifestRejected, verify_manifest
from deployment import config
from deployment.errors import PublisherError, Reason
from deployment.publish import artifacts, gate, rollout, signing
from deployment.publish.audit import AuditLog, default_actor
from deployment.publish.hub_client import AzureHub, Hub
from deployment.publish.registry import (
    BASELINE_ARTIFACT_DIR,
    CHAMPION,
    ModelEntry,
    Registry,
    parse_ref,
    read_metrics,
    ring_alias,
)
from deployment.publish.release import (
    ModelCheckError,
    contract_changes,
    describe_model,
    unsigned_manifest,
)
from wire.bounded_json import BoundedJsonError, loads
from wire.reported import ModelEntry as ReportedEntry
from wire.reported import read_entry

log = structlog.get_logger(__name__)

HubFactory = Callable[[str, str | None], Hub]
# Tags a version gets for itself; a rollback version copies every other tag of the one it restores.
_OWN_TAGS = frozenset({"lineage", "signed_by"})
# A release whose SAS runs out during the rollout would strand devices mid-download.
MIN_URL_VALIDITY = timedelta(hours=1)


def _azure_hub(connection_string: str, ca_file: str | None) -> Hub:
    return AzureHub(connection_string, ca_file=ca_file)


@dataclass
class Services:
    """The outside world of one command, made on first use."""

    resolved: config.Resolved
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    hub_factory: HubFactory = _azure_hub
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _registry: Registry | None = None
    _hub: Hub | None = None
    _blobs: artifacts.BlobArtifacts | None = None

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.resolved.audit_log, actor=default_actor(self.environ), clock=self.now)

    @property
    def releases_dir(self) -> Path:
        return self.resolved.audit_log.parent / "releases"

    def registry(self, *, create: bool = False) -> Registry:
        """``create``: a command that registers may start a new SQLite registry; reads may not."""
        if self._registry is None:
            self._registry = Registry.connect(self.resolved.mlflow_tracking_uri, create=create)
        return self._registry

    def hub(self) -> Hub:
        if self._hub is None:
            secret = config.secret(config.HUB_SECRET, self.resolved, self.environ)
            ca_file = self.resolved.env.hub_ca_file
            self._hub = self.hub_factory(
                secret, str(self.resolved.path(ca_file)) if ca_file is not None else None
            )
        return self._hub

    def blobs(self) -> artifacts.BlobArtifacts:
        if self._blobs is None:
            secret = config.secret(config.STORAGE_SECRET, self.resolved, self.environ)
            self._blobs = artifacts.BlobArtifacts.from_connection_string(
                secret,
                self.resolved.env.storage_container,
                retry_budget_s=self.resolved.env.storage_retry_seconds,
            )
        return self._blobs

    def signing_key(self) -> signing.SigningKey:
        return signing.load(self.resolved, self.environ)


class Publisher:
    def __init__(self, services: Services, out: Console, err: Console) -> None:
        self._s = services
        self._out = out
        self._err = err

    # ------------------------------------------------------------------ registry

    def register(
        self,
        model_path: Path,
        *,
        name: str | None,
        metrics_path: Path,
        baseline: Path | None,
        run_id: str | None,
        version: int | None,
    ) -> ModelEntry:
        name = name or model_path.stem
        audit = self._s.audit
        try:
            entry = self._register(
                model_path,
                name=name,
                metrics_path=metrics_path,
                baseline=baseline,
                run_id=run_id,
                version=version,
            )
        except PublisherError as e:
            audit.append("register", name, "failed", reason=str(e.reason), message=e.message)
            raise
        changes = self._contract_changes(entry)
        if changes:
            # Not refused: a new contract may be intended; the release marks it contract_change.
            self._err.print(
                f"edgeml: warning: {entry.ref} changes the tensor contract of the champion: "
                + "; ".join(changes),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        audit.append(
            "register",
            entry.ref,
            "registered",
            sha256=entry.sha256,
            size=entry.size,
            run_id=entry.run_id,
            file=model_path.name,
            **({"contract_changes": changes} if changes else {}),
        )
        self._out.print(f"registered {entry.ref} sha256={entry.sha256} size={entry.size}")
        return entry

    def _contract_changes(self, entry: ModelEntry) -> list[str]:
        registry = self._s.registry()
        champion = registry.alias_version(entry.name, CHAMPION)
        if champion is None or champion == entry.version:
            return []
        return contract_changes(registry.entry(entry.name, champion).contract, entry.contract)

    def _register(
        self,
        model_path: Path,
        *,
        name: str,
        metrics_path: Path,
        baseline: Path | None,
        run_id: str | None,
        version: int | None,
    ) -> ModelEntry:
        rollout.check_model_name(name)
        try:
            data = model_path.read_bytes()
        except OSError as e:
            raise PublisherError(
                Reason.MODEL_INVALID, f"cannot read model file {str(model_path)!r}: {e.strerror}"
            ) from e
        metrics = read_metrics(metrics_path)
        if baseline is not None:
            _check_json_file(baseline, "baseline")
        try:
            described = describe_model(data)
        except ModelCheckError as e:
            raise PublisherError(e.reason, f"{model_path.name}: {e.message}") from e
        registry = self._s.registry(create=True)
        if registry.created:
            self._err.print(
                f"edgeml: notice: created a new MLflow database {registry.uri}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return registry.register(
            name,
            model_path,
            described,
            metrics=metrics,
            baseline=baseline,
            run_id=run_id,
            expected_version=version,
        )

    def list_models(self) -> None:
        table = Table("model", "latest", "sha256", "aliases", "registered")
        for entry in self._s.registry().models():
            table.add_row(
                entry.name,
                str(entry.version),
                entry.sha256[:12],
                ", ".join(entry.aliases),
                _when(entry.created_ms),
            )
        self._out.print(table)

    def show(self, ref: str) -> None:
        name, version = parse_ref(ref, version_required=False)
        registry = self._s.registry()
        entry = registry.entry(name, version)
        table = Table("field", "value", show_header=False)
        for key, value in (
            ("model", entry.ref),
            ("sha256", entry.sha256),
            ("size", str(entry.size)),
            ("contract", json.dumps(entry.contract)),
            ("aliases", ", ".join(entry.aliases) or "-"),
            ("run", entry.run_id),
            ("lineage", entry.lineage),
            ("blob", entry.tags.get("blob", "-")),
            ("signed by", entry.tags.get("signed_by", "-")),
            ("registered", _when(entry.created_ms)),
        ):
            table.add_row(key, value)
        for metric, number in sorted(registry.metrics(entry).items()):
            table.add_row(f"metric {metric}", f"{number:g}")
        self._out.print(table)

    def history(self, name: str) -> None:
        table = Table("version", "sha256", "aliases", "lineage", "registered")
        for entry in self._s.registry().history(name):
            table.add_row(
                str(entry.version),
                entry.sha256[:12],
                ", ".join(entry.aliases),
                entry.lineage,
                _when(entry.created_ms),
            )
        self._out.print(table)

    # ------------------------------------------------------------------ artifacts and signing

    def upload(self, ref: str) -> None:
        name, version = parse_ref(ref)
        assert version is not None  # parse_ref guarantees it when required
        registry = self._s.registry()
        entry = registry.entry(name, version)
        blobs = self._s.blobs()
        self._plain_http(blobs.endpoint, "upload")
        try:
            with tempfile.TemporaryDirectory() as folder:
                path = registry.model_file(entry, Path(folder))
                blob = artifacts.blob_name(name, version, entry.sha256)
                with self._progress() as progress:
                    task = progress.add_task(f"upload {entry.ref}", total=path.stat().st_size)
                    uploaded = blobs.upload(
                        path,
                        blob,
                        entry.sha256,
                        lambda done, total: progress.update(task, completed=done, total=total),
                    )
                registry.tag(entry, "blob", uploaded.blob_name)
                baseline_file = entry.tags.get("baseline_file")
                if baseline_file:
                    local = registry.artifact(entry, f"baseline/{baseline_file}", Path(folder))
                    baseline_blob = artifacts.blob_name(
                        name, version, entry.tags["baseline_sha256"], "json"
                    )
                    blobs.upload(local, baseline_blob, entry.tags["baseline_sha256"])
                    registry.tag(entry, "baseline_blob", baseline_blob)
        except PublisherError as e:
            self._s.audit.append("upload", entry.ref, "failed", reason=str(e.reason))
            raise
        self._s.audit.append(
            "upload",
            entry.ref,
            "uploaded" if uploaded.uploaded else "already_present",
            blob=uploaded.blob_name,
            url=uploaded.url,
            sha256=entry.sha256,
        )
        self._out.print(f"uploaded {entry.ref} to {uploaded.url} (sha256 checked)")

    def _progress(self) -> Progress:
        return Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self._err,
            transient=True,
            disable=not self._err.is_terminal,
        )

    def sign(self, ref: str, *, url: str | None, valid_hours: float | None) -> dict[str, Any]:
        name, version = parse_ref(ref)
        assert version is not None
        entry = self._s.registry().entry(name, version)
        manifest = self._sign(entry, url=url, valid_hours=valid_hours, action="sign")
        self._out.print(
            f"signed {entry.ref} with {manifest['signature']['key_id']}, "
            f"expires {manifest.get('expires', 'never')}: {self._manifest_file(entry)}"
        )
        return manifest

    def _sign(
        self,
        entry: ModelEntry,
        *,
        url: str | None,
        valid_hours: float | None,
        action: str,
        contract_change: bool = False,
    ) -> dict[str, Any]:
        key = self._s.signing_key()
        now = self._s.now()
        hours = valid_hours if valid_hours is not None else self._s.resolved.env.sas_hours
        valid_for = timedelta(hours=hours)
        baseline = None
        if url is None:
            blob = entry.tags.get("blob")
            if not blob:
                raise PublisherError(
                    Reason.NOT_FOUND, f"{entry.ref} is not uploaded: run upload, or give --url"
                )
            blobs = self._s.blobs()
            url = blobs.read_url(blob, now + valid_for, now)
            baseline_blob = entry.tags.get("baseline_blob")
            if baseline_blob:
                # The device fetches the pack like the model: bounded by its size, checked by hash.
                baseline = {
                    "sha256": entry.tags["baseline_sha256"],
                    "size": int(entry.tags["baseline_size"]),
                    "url": blobs.read_url(baseline_blob, now + valid_for, now),
                }
        self._plain_http(url, action)
        with tempfile.TemporaryDirectory() as folder:
            described = self._s.registry().described(entry, Path(folder))
        unsigned = unsigned_manifest(
            described,
            name=entry.name,
            version=entry.version,
            url=url,
            created=now,
            valid_for=valid_for,
            contract_change=contract_change,
            baseline=baseline,
        )
        manifest = key.sign(unsigned)
        path = self._manifest_file(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(manifest, file, sort_keys=True)
        temporary.replace(path)
        self._s.registry().tag(entry, "signed_by", key.key_id)
        self._s.audit.append(
            action,
            entry.ref,
            "signed",
            key_id=key.key_id,
            url=url.split("?", 1)[0],
            expires=str(manifest.get("expires")),
        )
        return manifest

    def _plain_http(self, url: str, action: str) -> None:
        """Devices fetch artifacts over https only (http only from hosts they allow-list): a
        lab environment is warned, any other refused before anything is signed or sent."""
        if urllib.parse.urlsplit(url).scheme != "http":
            return
        shown = url.split("?", 1)[0]  # never the SAS token
        resolved = self._s.resolved
        if not resolved.env.lab:
            raise PublisherError(
                Reason.INSECURE_URL,
                f"{action}: the artifact URL {shown} is plain http, which devices refuse unless "
                f"its host is in their allow_http_hosts: serve it over https, or mark the "
                f"environment {resolved.name!r} as a lab (lab = true)",
            )
        self._err.print(
            f"edgeml: warning: {action}: the artifact URL {shown} is plain http; devices fetch "
            "it only from hosts in their allow_http_hosts",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def _manifest_file(self, entry: ModelEntry) -> Path:
        return self._s.releases_dir / entry.name / f"{entry.version}.manifest.json"

    def _signed_manifest(self, entry: ModelEntry) -> dict[str, Any]:
        path = self._manifest_file(entry)
        try:
            manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise PublisherError(
                Reason.NOT_FOUND, f"{entry.ref} is not signed yet: run sign (or upload, sign)"
            ) from e
        key = self._s.signing_key()
        try:
            verify_manifest(manifest, {key.key_id: key.private.public_key()}, self._s.now())
        except ManifestRejected as e:
            if e.reason == "expired":
                raise PublisherError(
                    Reason.SAS_EXPIRED, f"{entry.ref}: the signed URL expired: run refresh-url"
                ) from e
            if e.reason == "unknown_key":
                raise PublisherError(
                    Reason.KEY_INVALID,
                    f"{entry.ref} was signed with another key: run refresh-url to re-sign",
                ) from e
            raise PublisherError(Reason.SCHEMA_INVALID, f"{entry.ref}: {e.message}") from e
        if manifest.get("sha256") != entry.sha256 or manifest.get("version") != entry.version:
            raise PublisherError(
                Reason.SCHEMA_INVALID, f"{path} does not describe {entry.ref} any more"
            )
        expires = manifest.get("expires")
        if expires and datetime.fromisoformat(expires) - self._s.now() < MIN_URL_VALIDITY:
            raise PublisherError(
                Reason.SAS_EXPIRED, f"{entry.ref}: the signed URL expires at {expires}: refresh-url"
            )
        return manifest

    def refresh_url(self, ref: str, *, valid_hours: float | None) -> None:
        name, version = parse_ref(ref)
        assert version is not None
        entry = self._s.registry().entry(name, version)
        manifest = self._sign(entry, url=None, valid_hours=valid_hours, action="refresh-url")
        refreshed = self._rollout().refresh(name, version, manifest, self._rings())
        self._s.audit.append("refresh-url", entry.ref, "repointed", rings=refreshed)
        self._out.print(
            f"re-signed {entry.ref}, expires {manifest['expires']}; "
            f"rings re-pointed: {', '.join(refreshed) or 'none'}"
        )

    # ------------------------------------------------------------------ rollout

    def _rings(self) -> list[rollout.Ring]:
        return rollout.rings_from_config(self._s.resolved.env.rings)

    def _rollout(self) -> rollout.Rollout:
        registry = self._s.registry()
        return rollout.Rollout(
            self._s.hub(),
            self._s.audit,
            module=self._s.resolved.env.module,
            alias_of=lambda model, ring: registry.alias_version(model, ring_alias(ring)),
            set_alias=self._set_alias,
            rerelease=self._rerelease,
            ring_variable=_split_pair(self._s.resolved.env.ring_variable),
            clock=self._s.monotonic,
            sleep=self._s.sleep,
            report=self._report_progress,
        )

    def _report_progress(self, line: str) -> None:
        # On stderr: stdout keeps the command's result for scripts.
        self._err.print(line, markup=False, highlight=False, soft_wrap=True)

    def _set_alias(self, model: str, ring: str, version: int) -> None:
        registry = self._s.registry()
        registry.set_alias(model, ring_alias(ring), version)
        if ring == next(reversed(self._s.resolved.env.rings), None):
            registry.set_alias(model, CHAMPION, version)

    def _rerelease(self, model: str, bad: int, previous: int) -> tuple[int, Mapping[str, Any]]:
        """The previous artifact as a new, higher version: restarted devices converge too.

        It carries all the restored release carried (baseline, golden, contract, tags, the
        manifest's ``contract_change``). Run again for the same halt (a rerun finishing it), it
        finds the version it registered by its lineage instead of registering another.
        """
        registry = self._s.registry()
        old = registry.entry(model, previous)
        lineage = f"rollback of {model}:{bad} to {model}:{previous}"
        entry = registry.with_lineage(model, lineage)
        if entry is None:
            entry = self._register_rollback(old, bad, lineage)
        for key, value in old.tags.items():  # blob, baseline_blob: the same bytes, uploaded
            if key not in _OWN_TAGS and entry.tags.get(key) != value:
                registry.tag(entry, key, value)
        entry = registry.entry(model, entry.version)
        try:
            return entry.version, self._signed_manifest(entry)  # signed before the cut-off
        except PublisherError:
            pass  # not signed yet, or no longer valid: sign it now
        restored = _read_manifest(self._manifest_file(old))
        # Devices that ran the bad release check the restore against its contract.
        changed = dict(registry.entry(model, bad).contract) != dict(old.contract)
        manifest = self._sign(
            entry,
            url=None if entry.tags.get("blob") else _unsigned_url(self._manifest_file(old)),
            valid_hours=None,
            action="sign",
            contract_change=bool(restored.get("contract_change")) or changed,
        )
        return entry.version, manifest

    def _register_rollback(self, old: ModelEntry, bad: int, lineage: str) -> ModelEntry:
        registry = self._s.registry()
        with tempfile.TemporaryDirectory() as folder:
            path = registry.model_file(old, Path(folder))
            described = registry.described(old, Path(folder) / "described")
            baseline_file = old.tags.get("baseline_file")
            baseline = (
                registry.artifact(
                    old, f"{BASELINE_ARTIFACT_DIR}/{baseline_file}", Path(folder) / "baseline"
                )
                if baseline_file
                else None
            )
            entry = registry.register(
                old.name,
                path,
                described,
                metrics=registry.metrics(old),
                baseline=baseline,
                lineage=lineage,
            )
        self._s.audit.append(
            "register", entry.ref, "registered", sha256=entry.sha256, rollback_of=bad
        )
        return entry

    def release(
        self, ref: str, rings: Sequence[str], bounds: gate.GateBounds, *, dry_run: bool
    ) -> None:
        name, version = parse_ref(ref)
        assert version is not None
        rollout.check_model_name(name)
        chosen = rollout.select_rings(self._rings(), rings)
        entry = self._s.registry().entry(name, version)
        manifest = self._signed_manifest(entry)
        self._plain_http(str(manifest.get("url", "")), "release")
        runner = self._rollout()
        if dry_run:
            table = Table("ring", "condition", "layer", "priority", "devices", "done")
            for planned in runner.plan(name, version, manifest, chosen):
                shown = ", ".join(planned.devices[:8])
                more = len(planned.devices) - 8
                table.add_row(
                    planned.ring.name,
                    planned.ring.condition,
                    planned.config_id,
                    str(planned.ring.priority),
                    f"{len(planned.devices)}: {shown}" + (f" (+{more})" if more > 0 else ""),
                    "yes" if planned.done else "no",
                )
            self._out.print(table)
            self._out.print(
                f"dry run: {entry.ref} would set {self._s.resolved.env.module}."
                f"{rollout.desired_path(name)}; nothing was changed"
            )
            return
        outcome = runner.release(name, version, manifest, chosen, bounds)
        if outcome == "unchanged":
            self._out.print(f"{entry.ref} is already released to {', '.join(rings)}: no change")
        else:
            self._out.print(f"released {entry.ref} to {', '.join(rings)}")
        if bounds.allow_no_traffic:
            self._out.print(_no_traffic_note(runner.progress(name, version).without_traffic))

    def status(self, name: str | None, *, repair: bool = False) -> None:
        if repair:
            for subject in self._rollout().repair():
                self._out.print(f"finished the halt of {subject} that a previous run left")
        hub = self._s.hub()
        module = self._s.resolved.env.module
        rings = self._rings()
        ring_of: dict[str, str] = {}
        for ring in rings:
            for device in rollout.Rollout.devices_of(hub, ring.condition):
                ring_of.setdefault(device, ring.name)
        # A twin query, not SQL; the module name was checked against a pattern by the config.
        twins = hub.query(f"SELECT * FROM devices.modules WHERE moduleId = '{module}'")  # noqa: S608
        table = Table(
            "ring", "device", "model", "version", "state", "probation state", "drift", "last seen"
        )
        order = {ring.name: index for index, ring in enumerate(rings)}
        rows = []
        for twin in twins:
            device = str(twin.get("deviceId"))
            reported = twin.get("properties", {}).get("reported", {})
            models = reported.get("models") if isinstance(reported, dict) else None
            for model, report in sorted((models or {}).items()):
                entry = read_entry(report, ReportedEntry)
                if (name is not None and model != name) or entry is None:
                    continue
                ring_name = ring_of.get(device, "-")
                rows.append(
                    (
                        order.get(ring_name, len(order)),
                        ring_name,
                        device,
                        model,
                        _shown(entry.version),
                        _shown(entry.state),
                        _shown(entry.probation.state if entry.probation else None),
                        _shown(entry.drift.state if entry.drift else None),
                        _last_seen(twin),
                    )
                )
        for row in sorted(rows):
            table.add_row(*row[1:])
        self._out.print(table)
        layers = Table("layer", "ring", "version", "priority", "targeted", "applied", "metrics")
        for layer in hub.configurations():
            if rollout.LABEL_MODEL not in layer.labels:
                continue
            if name is not None and layer.labels[rollout.LABEL_MODEL] != name:
                continue
            layers.add_row(
                layer.id,
                layer.labels.get(rollout.LABEL_RING, "-"),
                layer.labels.get(rollout.LABEL_VERSION, "-"),
                str(layer.priority),
                str(layer.targeted),
                str(layer.applied),
                json.dumps(dict(layer.metric_results or {}), sort_keys=True),
            )
        self._out.print(layers)

    # ------------------------------------------------------------------ audit

    def audit_verify(self) -> None:
        count, head = self._s.audit.verify()
        self._out.print(f"audit log intact: {count} entries, head {head}")

    def audit_show(self, subject: str | None) -> None:
        table = Table("seq", "time", "actor", "action", "subject", "outcome")
        for entry in self._s.audit.entries():
            if subject is None or entry.subject == subject:
                table.add_row(
                    str(entry.seq),
                    entry.time,
                    entry.actor,
                    entry.action,
                    entry.subject,
                    entry.outcome,
                )
        self._out.print(table)


def _split_pair(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    module, _, variable = value.partition(":")
    return module, variable


# A baseline pack given to `register`: bounded as the agent bounds it (`parse_baseline`).
_INPUT_FILE_LIMITS = BASELINE_LIMITS


def _check_json_file(path: Path, what: str) -> None:
    try:
        with path.open("rb") as file:
            loads(file.read(_INPUT_FILE_LIMITS.max_bytes + 1), _INPUT_FILE_LIMITS)
    except FileNotFoundError as e:
        raise PublisherError(Reason.MODEL_INVALID, f"no {what} file {str(path)!r}") from e
    except (OSError, BoundedJsonError) as e:
        raise PublisherError(Reason.MODEL_INVALID, f"{what} file {str(path)!r}: {e}") from e


def _read_manifest(path: Path) -> dict[str, Any]:
    """A signed manifest file as written by ``sign``; {} when there is none."""
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise PublisherError(Reason.SCHEMA_INVALID, f"{path} is unreadable ({e})") from e
    return manifest


def _unsigned_url(previous_manifest: Path) -> str:
    try:
        return str(json.loads(previous_manifest.read_text())["url"])
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise PublisherError(
            Reason.NOT_FOUND, f"cannot re-release: {previous_manifest} is unreadable"
        ) from e


def _when(created_ms: int) -> str:
    return datetime.fromtimestamp(created_ms / 1000, UTC).isoformat(timespec="seconds")


def _last_seen(twin: Mapping[str, Any]) -> str:
    for candidate in (
        twin.get("lastActivityTime"),
        twin.get("properties", {}).get("reported", {}).get("$metadata", {}).get("$lastUpdated"),
    ):
        if isinstance(candidate, str) and not candidate.startswith("0001-"):
            return candidate
    return "-"


def _shown(value: object) -> str:
    """A reported value in a table cell; '-' where the device reports none."""
    return "-" if value is None else str(value)


def _no_traffic_note(without_traffic: Mapping[str, int]) -> str:
    """Which of the two a gate with --allow-no-traffic did: accepted quiet devices, or not."""
    if not without_traffic:
        return "--allow-no-traffic: not needed, every device passed probation on traffic"
    rings = ", ".join(f"{ring}: {count}" for ring, count in without_traffic.items())
    return (
        "--allow-no-traffic: accepted devices that saw no traffic during probation "
        f"(passed_without_traffic; devices by ring: {rings})"
    )

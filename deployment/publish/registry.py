"""The model registry on MLflow: versions, their facts as tags, artifacts, and ring aliases.

MLflow numbers the versions of a registered model 1, 2, 3, … and never reuses one, which is
exactly what devices demand of a release version; so the registry version *is* the manifest
version. What a device checks (sha256, size, contract) is kept as version tags, the golden
sample and the drift baseline as artifacts of the version's run, and an alias per ring
(``ring-canary``, …, and ``champion`` for the last ring) says what each ring runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from deployment.errors import PublisherError, Reason

EXPERIMENT = "edgeml-publisher"
CHAMPION = "champion"
DESCRIBED_ARTIFACT = "release/described.json"
MODEL_ARTIFACT_DIR = "model"
BASELINE_ARTIFACT_DIR = "baseline"


def ring_alias(ring: str) -> str:
    return f"ring-{ring}"


@dataclass(frozen=True)
class ModelEntry:
    """One registered version, as a release needs it."""

    name: str
    version: int
    sha256: str
    size: int
    contract: Mapping[str, Any]
    run_id: str
    created_ms: int
    lineage: str
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def parse_ref(text: str, *, version_required: bool = True) -> tuple[str, int | None]:
    """``NAME:VERSION`` (or ``NAME`` when the version is optional) from the command line."""
    name, sep, version = text.partition(":")
    if not name:
        raise PublisherError(Reason.USAGE, f"{text!r}: expected NAME:VERSION")
    if not sep:
        if version_required:
            raise PublisherError(Reason.USAGE, f"{text!r}: expected NAME:VERSION")
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise PublisherError(Reason.USAGE, f"{text!r}: VERSION must be a positive integer")
    return name, int(version)


def read_metrics(path: Path) -> dict[str, float]:
    """A flat JSON object of metric name to finite number."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PublisherError(Reason.MODEL_INVALID, f"no metrics file {str(path)!r}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PublisherError(Reason.MODEL_INVALID, f"metrics file {str(path)!r}: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise PublisherError(
            Reason.MODEL_INVALID, f"metrics file {str(path)!r}: expected a non-empty JSON object"
        )
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        number_ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not number_ok or not math.isfinite(value):
            raise PublisherError(
                Reason.MODEL_INVALID,
                f"metrics file {str(path)!r}: {key!r} must be a finite number",
            )
        metrics[key] = float(value)
    return metrics


# MLflow wraps most database errors in MlflowException, but not those of opening the store.
_FAILURES = (MlflowException, SQLAlchemyError)
SQLITE_PREFIX = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for other stores)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0])


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def failure_reason(text: str) -> Reason:
    """What a database error's text says went wrong (pure)."""
    if "database is locked" in text or "database table is locked" in text:
        return Reason.LOCKED
    if "readonly database" in text or "read-only file system" in text.lower():
        return Reason.READ_ONLY
    return Reason.UNREACHABLE


def _unreachable(uri: str, error: Exception) -> PublisherError:
    database = sqlite_file(uri)
    if database is None:
        # A server's error text may quote its URL with credentials: the kind of error only.
        return PublisherError(Reason.UNREACHABLE, f"MLflow at {uri} failed: {type(error).__name__}")
    causes = _causes(error)
    text = " ".join(str(cause) for cause in causes)
    reason = failure_reason(text)
    if reason == Reason.LOCKED:
        why = "is locked by another process's transaction: try again when it ends"
    elif reason == Reason.READ_ONLY:
        why = "is read-only: this command writes, and needs write access to it and its folder"
    else:
        root = causes[-1]
        first = str(root).strip().splitlines()[:1] or [""]
        why = f"failed: {type(root).__name__}: {first[0][:200]}"
    return PublisherError(reason, f"MLflow database {database} {why}")


def _code(error: Exception) -> str:
    return str(getattr(error, "error_code", ""))


class Registry:
    """MLflow behind the few operations the publisher needs."""

    def __init__(self, client: MlflowClient, *, artifact_root: str | None = None) -> None:
        self._client = client
        self._artifact_root = artifact_root
        self.uri = client.tracking_uri
        self.created = False  # connect made a new SQLite database

    @classmethod
    def connect(cls, tracking_uri: str, *, create: bool = False) -> Registry:
        """A client on ``tracking_uri``; a SQLite store keeps its artifacts beside its file.

        A missing SQLite file is created only when ``create`` says so (``created`` tells):
        otherwise a typo in the path would silently open a new, empty registry.
        """
        artifact_root = None
        database = sqlite_file(tracking_uri)
        created = False
        if database is not None:
            if not database.parent.is_dir():
                raise PublisherError(
                    Reason.UNREACHABLE, f"MLflow database folder {database.parent} does not exist"
                )
            if not database.exists():
                if not create:
                    raise PublisherError(
                        Reason.NOT_FOUND,
                        f"no MLflow database {database} (is mlflow_tracking_uri right? "
                        "`register` creates a new one)",
                    )
                created = True
            artifact_root = (database.parent / "mlflow-artifacts").as_uri()
        try:
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            registry = cls(client, artifact_root=artifact_root)
            # A read: a store that is read-only still lists and shows.
            client.get_experiment_by_name(EXPERIMENT)
        except _FAILURES as e:
            raise _unreachable(tracking_uri, e) from e
        registry.created = created
        return registry

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return str(experiment.experiment_id)
        return str(
            self._client.create_experiment(EXPERIMENT, artifact_location=self._artifact_root)
        )

    # ---------------------------------------------------------------- write

    def register(
        self,
        name: str,
        model_path: Path,
        described: Mapping[str, Any],
        *,
        metrics: Mapping[str, float],
        baseline: Path | None = None,
        run_id: str | None = None,
        expected_version: int | None = None,
        lineage: str = "",
    ) -> ModelEntry:
        """Log the artifacts in a run (``run_id``: the training run) and make a version."""
        latest = self.latest_version(name)
        if expected_version is not None and expected_version <= latest:
            raise PublisherError(
                Reason.VERSION_NOT_MONOTONIC,
                f"{name}: version {expected_version} is not newer than {latest}",
            )
        if expected_version is not None and expected_version != latest + 1:
            raise PublisherError(
                Reason.VERSION_NOT_MONOTONIC,
                f"{name}: the next version is {latest + 1}, not {expected_version}",
            )
        try:
            if run_id is None:
                run_id = self._client.create_run(
                    self._experiment_id(), run_name=f"register-{name}"
                ).info.run_id
            else:
                self._client.get_run(run_id)
            self._client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
            self._client.log_artifact(run_id, str(model_path), MODEL_ARTIFACT_DIR)
            tags = {
                "sha256": str(described["sha256"]),
                "size": str(described["size"]),
                "contract": json.dumps(described["contract"], sort_keys=True),
                "lineage": lineage or f"run {run_id}, file {model_path.name}",
                "model_file": model_path.name,
            }
            if baseline is not None:
                self._client.log_artifact(run_id, str(baseline), BASELINE_ARTIFACT_DIR)
                tags["baseline_sha256"] = hashlib.sha256(baseline.read_bytes()).hexdigest()
                tags["baseline_size"] = str(baseline.stat().st_size)  # manifest schema 2
                tags["baseline_file"] = baseline.name
            with tempfile.TemporaryDirectory() as folder:
                described_file = Path(folder) / Path(DESCRIBED_ARTIFACT).name
                described_file.write_text(json.dumps(described, sort_keys=True))
                self._client.log_artifact(
                    run_id, str(described_file), str(Path(DESCRIBED_ARTIFACT).parent)
                )
            if not self._client.search_registered_models(f"name = '{name}'"):
                self._client.create_registered_model(name)
            created = self._client.create_model_version(
                name, f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}", run_id=run_id, tags=tags
            )
        except _FAILURES as e:
            if "RESOURCE_DOES_NOT_EXIST" in _code(e):
                raise PublisherError(Reason.NOT_FOUND, f"no MLflow run {run_id!r}") from e
            raise _unreachable(self.uri, e) from e
        version = int(created.version)
        if expected_version is not None and version != expected_version:
            # Another publisher registered in between: say so rather than mislabel.
            raise PublisherError(
                Reason.VERSION_NOT_MONOTONIC,
                f"{name}: MLflow assigned version {version}, expected {expected_version}",
            )
        return self.entry(name, version)

    def tag(self, entry: ModelEntry, key: str, value: str) -> None:
        try:
            self._client.set_model_version_tag(entry.name, str(entry.version), key, value)
        except _FAILURES as e:
            raise _unreachable(self.uri, e) from e

    def set_alias(self, name: str, alias: str, version: int) -> None:
        try:
            self._client.set_registered_model_alias(name, alias, str(version))
        except _FAILURES as e:
            raise _unreachable(self.uri, e) from e

    def alias_version(self, name: str, alias: str) -> int | None:
        try:
            return int(self._client.get_model_version_by_alias(name, alias).version)
        except _FAILURES as e:
            if "RESOURCE_DOES_NOT_EXIST" in _code(e) or "INVALID_PARAMETER" in _code(e):
                return None
            raise _unreachable(self.uri, e) from e

    # ---------------------------------------------------------------- read

    def latest_version(self, name: str) -> int:
        versions = self._search(f"name = '{name}'")
        return max((int(v.version) for v in versions), default=0)

    def with_lineage(self, name: str, lineage: str) -> ModelEntry | None:
        """The newest version of ``name`` registered with exactly this lineage, if any."""
        found = [
            v for v in self._search(f"name = '{name}'") if (v.tags or {}).get("lineage") == lineage
        ]
        if not found:
            return None
        return self.entry(name, max(int(v.version) for v in found))

    def _search(self, filter_string: str) -> list[ModelVersion]:
        try:
            return list(self._client.search_model_versions(filter_string))
        except _FAILURES as e:
            raise _unreachable(self.uri, e) from e

    def entry(self, name: str, version: int | None = None) -> ModelEntry:
        """One version (the newest when ``version`` is None)."""
        if version is None:
            version = self.latest_version(name)
            if version == 0:
                raise PublisherError(Reason.NOT_FOUND, f"no registered model {name!r}")
        try:
            found = self._client.get_model_version(name, str(version))
        except _FAILURES as e:
            if "RESOURCE_DOES_NOT_EXIST" in _code(e):
                raise PublisherError(Reason.NOT_FOUND, f"no version {name}:{version}") from e
            raise _unreachable(self.uri, e) from e
        return _entry(found)

    def history(self, name: str) -> list[ModelEntry]:
        versions = sorted(self._search(f"name = '{name}'"), key=lambda v: int(v.version))
        if not versions:
            raise PublisherError(Reason.NOT_FOUND, f"no registered model {name!r}")
        # search results carry no aliases: read each version for them.
        return [self.entry(name, int(v.version)) for v in versions]

    def models(self) -> list[ModelEntry]:
        """The newest version of every registered model."""
        try:
            registered = list(self._client.search_registered_models())
        except _FAILURES as e:
            raise _unreachable(self.uri, e) from e
        return [self.entry(m.name) for m in sorted(registered, key=lambda m: m.name)]

    def metrics(self, entry: ModelEntry) -> dict[str, float]:
        try:
            return dict(self._client.get_run(entry.run_id).data.metrics)
        except _FAILURES as e:
            raise _unreachable(self.uri, e) from e

    def artifact(self, entry: ModelEntry, path: str, destination: Path) -> Path:
        try:
            return Path(self._client.download_artifacts(entry.run_id, path, str(destination)))
        except (*_FAILURES, OSError) as e:
            raise PublisherError(
                Reason.NOT_FOUND, f"{entry.ref}: artifact {path!r} cannot be read ({e})"
            ) from e

    def model_file(self, entry: ModelEntry, destination: Path) -> Path:
        """The artifact downloaded under `destination`, checked against the registered sha256."""
        model_file = entry.tags.get("model_file", "")
        path = self.artifact(entry, f"{MODEL_ARTIFACT_DIR}/{model_file}", destination)
        with path.open("rb") as stream:
            digest = hashlib.file_digest(stream, "sha256").hexdigest()
        if digest != entry.sha256:
            raise PublisherError(
                Reason.MODEL_INVALID, f"{entry.ref}: the stored artifact no longer matches sha256"
            )
        return path

    def described(self, entry: ModelEntry, destination: Path) -> dict[str, Any]:
        described: dict[str, Any] = json.loads(
            self.artifact(entry, DESCRIBED_ARTIFACT, destination).read_text()
        )
        if described.get("sha256") != entry.sha256:
            raise PublisherError(
                Reason.MODEL_INVALID, f"{entry.ref}: stored description does not match sha256"
            )
        return described


def _entry(version: ModelVersion) -> ModelEntry:
    tags = dict(version.tags or {})
    try:
        return ModelEntry(
            name=version.name,
            version=int(version.version),
            sha256=tags["sha256"],
            size=int(tags["size"]),
            contract=json.loads(tags["contract"]),
            run_id=str(version.run_id),
            created_ms=int(version.creation_timestamp or 0),
            lineage=tags.get("lineage", ""),
            tags=tags,
            aliases=tuple(sorted(version.aliases or ())),
        )
    except (KeyError, ValueError) as e:
        raise PublisherError(
            Reason.NOT_FOUND,
            f"{version.name}:{version.version} was not registered by this publisher ({e})",
        ) from e

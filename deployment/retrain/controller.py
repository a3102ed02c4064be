"""The retraining controller (`python -m deployment watch`): poll, decide, train, gate, release.

Each poll reads the fleet's reported drift and quality states through one twin query and lists
the labelled data there is; `retrain_policy.decide` says whether to start. A job trains the
candidate, compares it with the champion on the held-out part of the newest field data and on
the pipeline's holdout, and hands a better candidate to the publisher, which releases it ring
by ring. The job's progress is persisted after every stage, so a restart resumes it where it
stopped instead of training twice; every decision goes to the audit log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from deployment.drift.baseline_pack import BaselineOptions
from deployment.errors import PublisherError, Reason
from deployment.publish.rollout import module_models
from deployment.retrain.pipeline import (
    HOLDOUT_FILE,
    PipelineConfig,
    Tracker,
    evaluate,
    load_labelled,
    read_outputs,
    run_pipeline,
)
from deployment.retrain.policy import (
    ControllerState,
    Decision,
    FleetSignal,
    GateResult,
    RetrainPolicy,
    decide,
    promotion_gate,
)
from wire.reported import ModelEntry, read_entry
from wire.states import DriftState

log = structlog.get_logger(__name__)

DATA_SUFFIXES = (".csv", ".npz")
# Share of the newest field data kept out of training: the candidate and the champion are
# compared on it, so the gate measures the drifted regime on rows neither model has seen.
WINDOW_SHARE = 0.3
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Fleet(Protocol):
    def query(self, text: str) -> list[dict[str, Any]]: ...


class Audit(Protocol):
    def append(self, action: str, subject: str, outcome: str, **details: Any) -> object: ...


class Trainer(Protocol):
    def __call__(self, out_dir: Path, data: tuple[Path, ...]) -> None:
        """Writes model.onnx, metrics.json, train_sample.npy (and holdout.npz) into `out_dir`."""


@dataclass(frozen=True)
class PipelineTrainer:
    """The example pipeline, in this process, tracked by `tracker`."""

    tracker: Tracker
    seed: int = 7
    rows: int = 3000
    baseline: BaselineOptions = field(default_factory=BaselineOptions)

    def __call__(self, out_dir: Path, data: tuple[Path, ...]) -> None:
        config = PipelineConfig(
            out_dir, seed=self.seed, rows=self.rows, data=data, baseline=self.baseline
        )
        run_pipeline(config, self.tracker)


@dataclass(frozen=True)
class CommandTrainer:
    """A user's own pipeline: `argv` with `{out}` replaced; field data in EDGEML_TRAIN_DATA."""

    argv: tuple[str, ...]
    timeout_s: float = 3600.0

    def __call__(self, out_dir: Path, data: tuple[Path, ...]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = [part.replace("{out}", str(out_dir)) for part in self.argv]
        environ = {**os.environ, "EDGEML_TRAIN_DATA": os.pathsep.join(str(p) for p in data)}
        try:
            done = subprocess.run(  # noqa: S603 - the operator's own configured command
                argv,
                env=environ,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PublisherError(
                Reason.PIPELINE_FAILED, f"pipeline command {argv[0]!r} did not run: {error}"
            ) from None
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise PublisherError(
                Reason.PIPELINE_FAILED,
                f"pipeline command {argv[0]!r} exited {done.returncode}: {tail[0][:300]}",
            )


class Releaser(Protocol):
    def champion(self, model: str) -> bytes | None:
        """The model bytes the fleet's last ring runs, or None before any release."""

    def register(self, model: str, out_dir: Path) -> int:
        """Register the candidate in `out_dir`; its version."""

    def release(self, model: str, version: int, reason: str) -> None:
        """Upload, sign and roll out a registered version (repeatable: each step resumes)."""


def fleet_signal(fleet: Fleet, module: str, model: str) -> FleetSignal:
    """Drift or quality state of `model` on every device's agent module, by one twin query."""
    # Whole module twins: the service SDK reads query rows as twins and drops projected fields.
    rows = fleet.query(
        f"SELECT * FROM devices.modules WHERE moduleId = '{module}'"  # noqa: S608 - names are checked identifiers
    )
    states: dict[str, str] = {}
    for row in rows:
        reported = module_models(row, model)
        entry = read_entry(reported, ModelEntry) if reported else None
        if entry is None:
            continue
        # A degraded quality is not counted: the signal has only ever compared both states
        # with "drift", which a quality state never is.
        drift = entry.drift.state if entry.drift is not None else DriftState.OK
        states[str(row.get("deviceId"))] = drift.value
    return FleetSignal.from_states(states)


def data_files(folder: Path) -> dict[str, Path]:
    """Labelled data files in `folder`, keyed by name, size and modification time."""
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    return {f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}": p for p in files}


def split_window(
    x: np.ndarray, y: np.ndarray, share: float = WINDOW_SHARE
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(training part, gate window): the last `share` of the rows, in arrival order."""
    cut = len(x) - max(1, int(len(x) * share))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


@dataclass(frozen=True)
class Job:
    """A retraining in progress; `stage` is the last one that finished."""

    trigger: str
    started: float
    stage: str = "started"  # started → trained → gated → registered → released
    sha256: str | None = None
    promote: bool | None = None
    gate: dict[str, Any] | None = None
    version: int | None = None


class StateFile:
    """The controller's memory on disk, replaced atomically (temp, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[ControllerState, Job | None]:
        if not self.path.exists():
            return ControllerState(), None
        raw = json.loads(self.path.read_text())
        state = ControllerState(
            last_started=raw.get("last_started"),
            last_scheduled=raw.get("last_scheduled"),
            drift_streak=int(raw.get("drift_streak", 0)),
            seen_data=frozenset(raw.get("seen_data", ())),
        )
        job = Job(**raw["job"]) if raw.get("job") else None
        return state, job

    def save(self, state: ControllerState, job: Job | None) -> None:
        raw = {
            **asdict(state),
            "seen_data": sorted(state.seen_data),
            "job": asdict(job) if job else None,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as handle:
            json.dump(raw, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temp).replace(self.path)


LOCK_FILE = "controller.lock"


@contextlib.contextmanager
def work_dir_lock(work_dir: Path) -> Iterator[None]:
    """One controller per work folder, for as long as the block runs.

    An flock, not a pid file: the kernel drops it when the holder dies, so a crashed
    controller never keeps the folder. The holder writes its pid into the file so a second
    controller can say who has it.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise PublisherError(
                Reason.LOCKED,
                f"work folder {work_dir} is in use by another controller (pid {holder}, "
                f"holding {path})",
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


@dataclass(frozen=True)
class ControllerConfig:
    model: str
    module: str
    data_dir: Path
    work_dir: Path
    policy: RetrainPolicy

    def __post_init__(self) -> None:
        # Both names go into a twin query: identifiers only.
        for what, value in (("model", self.model), ("module", self.module)):
            if not _NAME.fullmatch(value):
                raise ValueError(f"{what} name {value!r} must match {_NAME.pattern}")


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        *,
        fleet: Fleet,
        trainer: Trainer,
        releaser: Releaser,
        audit: Audit,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._fleet = fleet
        self._trainer = trainer
        self._releaser = releaser
        self._audit = audit
        self._clock = clock
        self._store = StateFile(config.work_dir / "controller.json")

    @property
    def state_file(self) -> StateFile:
        return self._store

    def poll(self) -> Decision | Job:
        """One round: resume an unfinished job, or decide and maybe start one."""
        state, job = self._store.load()
        if job is not None:
            return self._run(state, job)
        signal = fleet_signal(self._fleet, self._config.module, self._config.model)
        files = data_files(self._config.data_dir)
        decision = decide(self._clock(), state, signal, frozenset(files), self._config.policy)
        if decision.trigger is None:
            log.info(
                "retrain_held",
                reason=str(decision.hold),
                devices=signal.devices,
                drifting=signal.drifting,
            )
            self._store.save(decision.state, None)
            return decision
        self._audit.append(
            "retrain",
            self._config.model,
            "started",
            trigger=str(decision.trigger),
            devices=signal.devices,
            drifting=signal.drifting,
            new_data=len(decision.new_data),
        )
        job = Job(trigger=str(decision.trigger), started=self._clock())
        self._store.save(decision.state, job)
        return self._run(decision.state, job)

    def _run(self, state: ControllerState, job: Job) -> Job:
        try:
            job = self._advance(state, job)
        except PublisherError as error:
            # Training, the gate or the rollout failed: recorded, and the controller goes on.
            self._audit.append(
                "retrain",
                self._config.model,
                "failed",
                reason=str(error.reason),
                error=error.message,
            )
            log.warning(
                "retrain_failed",
                model=self._config.model,
                reason=str(error.reason),
                error=error.message,
            )
            job = replace(job, stage="failed")
        self._store.save(state, None)
        return job

    def _advance(self, state: ControllerState, job: Job) -> Job:
        out_dir = self._config.work_dir / "candidate"
        window_dir = self._config.work_dir / "window"
        if job.stage == "started":
            train_files = self._prepare_data(window_dir)
            self._trainer(out_dir, train_files)
            model, metrics, _ = read_outputs(out_dir)
            job = replace(job, stage="trained", sha256=_sha256(model))
            self._audit.append(
                "retrain", self._config.model, "trained", sha256=job.sha256, **metrics
            )
            self._store.save(state, job)
        if job.stage == "trained":
            result = self._gate(out_dir, window_dir)
            job = replace(job, stage="gated", promote=result.promote, gate=asdict(result))
            self._audit.append(
                "retrain",
                self._config.model,
                "promote" if result.promote else "refused",
                **asdict(result),
            )
            self._store.save(state, job)
        if job.stage == "gated" and job.promote:
            version = self._releaser.register(self._config.model, out_dir)
            # Saved before the rollout starts: a restart releases this version, it does not
            # register the same bytes again as the next one.
            job = replace(job, stage="registered", version=version)
            self._audit.append("retrain", self._config.model, "registered", version=version)
            self._store.save(state, job)
        if job.stage == "registered" and job.version is not None:
            self._releaser.release(self._config.model, job.version, job.trigger)
            job = replace(job, stage="released")
            self._audit.append("retrain", self._config.model, "released", version=job.version)
            self._store.save(state, job)
        return job

    def _prepare_data(self, window_dir: Path) -> tuple[Path, ...]:
        """Field data for training, with the newest file's tail kept back as the gate window."""
        window_dir.mkdir(parents=True, exist_ok=True)
        (window_dir / "window.npz").unlink(missing_ok=True)
        files = sorted(data_files(self._config.data_dir).values(), key=lambda p: p.stat().st_mtime)
        if not files:
            return ()
        newest = files[-1]
        x, y = load_labelled(newest)
        (train_x, train_y), (window_x, window_y) = split_window(x, y)
        np.savez(window_dir / "train_part.npz", x=train_x, y=train_y)
        np.savez(window_dir / "window.npz", x=window_x, y=window_y)
        return (*files[:-1], window_dir / "train_part.npz")

    def _gate(self, out_dir: Path, window_dir: Path) -> GateResult:
        candidate, _, _ = read_outputs(out_dir)
        champion = self._releaser.champion(self._config.model)
        holdout = out_dir / HOLDOUT_FILE
        window = window_dir / "window.npz"
        if champion is None:
            # The first release has nothing to beat: its own pipeline gate decided.
            return GateResult(True, "no_champion", 0.0, 0.0, 0.0, 0.0)
        holdout_rows = load_labelled(holdout)
        window_rows = load_labelled(window) if window.exists() else holdout_rows
        return judge_candidate(candidate, champion, window_rows, holdout_rows, self._config.policy)


Labelled = tuple[np.ndarray, np.ndarray]


def judge_candidate(
    candidate: bytes, champion: bytes, window: Labelled, holdout: Labelled, policy: RetrainPolicy
) -> GateResult:
    """The promotion gate on the accuracy each exported model has on the window and holdout."""

    def accuracy(model: bytes, rows: Labelled) -> float:
        return evaluate(model, *rows)["accuracy"]

    return promotion_gate(
        candidate_window=accuracy(candidate, window),
        champion_window=accuracy(champion, window),
        candidate_holdout=accuracy(candidate, holdout),
        champion_holdout=accuracy(champion, holdout),
        policy=policy,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

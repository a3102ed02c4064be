"""The retraining controller over a fake fleet and publisher, with the real pipeline code."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployment.cli import _parser as cli_parser
from deployment.drift.baseline_pack import BaselineOptions
from deployment.errors import PublisherError, Reason
from deployment.examples import sensor_data
from deployment.retrain.controller import (
    CommandTrainer,
    Controller,
    ControllerConfig,
    Job,
    split_window,
    work_dir_lock,
)
from deployment.retrain.pipeline import (
    MODEL_FILE,
    PipelineConfig,
    _write_outputs,
    evaluate,
    export,
    lineage,
    prepare,
    search,
    write_baseline,
)
from deployment.retrain.policy import Decision, RetrainPolicy
from tests.support.clock import FakeClock

MODULE, MODEL = "mlagent", "sensor_classifier"
FAST_BASELINE = BaselineOptions(window_sizes=(50,), resamples=100, simulated_windows=5_000)


@dataclass
class FakeFleet:
    """Twin query rows as IoT Hub answers `SELECT *` on module twins."""

    states: dict[str, str] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)

    def query(self, text: str) -> list[dict[str, Any]]:
        self.queries.append(text)
        return [
            {
                "deviceId": device,
                "properties": {
                    "reported": {"models": {MODEL: {"version": 1, "drift": {"state": state}}}}
                },
            }
            for device, state in self.states.items()
        ]


@dataclass
class FakeReleaser:
    """A registry of versions (their bytes) and the releases asked for."""

    champion_bytes: bytes | None = None
    registered: list[bytes] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def champion(self, model: str) -> bytes | None:
        return self.champion_bytes

    def register(self, model: str, out_dir: Path) -> int:
        self.registered.append((out_dir / MODEL_FILE).read_bytes())
        return len(self.registered)

    def release(self, model: str, version: int, reason: str) -> None:
        self.champion_bytes = self.registered[version - 1]
        self.released.append((model, reason))
        self.versions.append(version)


@dataclass
class FakeAudit:
    entries: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def append(self, action: str, subject: str, outcome: str, **details: Any) -> None:
        self.entries.append((action, outcome, details))

    def outcomes(self) -> list[str]:
        return [outcome for _, outcome, _ in self.entries]


@dataclass
class SmallTrainer:
    """The pipeline's own steps without MLflow, on a small data set: fast and real."""

    calls: int = 0

    def __call__(self, out_dir: Path, data: tuple[Path, ...]) -> None:
        self.calls += 1
        config = PipelineConfig(out_dir, rows=600, data=data)
        prepared = prepare(config)
        family, model, _ = search(prepared, config.seed)
        model_bytes = export(model)
        metrics = evaluate(model_bytes, prepared.x_test, prepared.y_test)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_outputs(out_dir, model_bytes, metrics, prepared, lineage(config, prepared, family))
        write_baseline(out_dir, prepared, FAST_BASELINE)


@pytest.fixture(scope="module")
def clean_champion(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("champion")
    SmallTrainer()(out, ())
    return (out / MODEL_FILE).read_bytes()


@dataclass
class World:
    """The controller's outside world: all fakes but the pipeline code and the files."""

    fleet: FakeFleet
    releaser: FakeReleaser
    trainer: Any = field(default_factory=SmallTrainer)
    audit: FakeAudit = field(default_factory=FakeAudit)
    clock: FakeClock = field(default_factory=lambda: FakeClock(10_000.0))

    def controller(self, tmp_path: Path) -> Controller:
        config = ControllerConfig(
            model=MODEL,
            module=MODULE,
            data_dir=tmp_path / "data",
            work_dir=tmp_path / "work",
            policy=RetrainPolicy(cooldown_s=600.0, min_drifting_devices=2, sustain_polls=2),
        )
        return Controller(
            config,
            fleet=self.fleet,
            trainer=self.trainer,
            releaser=self.releaser,
            audit=self.audit,
            clock=self.clock,
        )


def drifted_field_data(folder: Path, rows: int = 900) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = sensor_data.generate(rows, seed=41, fault=sensor_data.RECALIBRATED)
    np.savez(folder / "field-0001.npz", x=x, y=y)


def test_sustained_fleet_drift_retrains_once_and_releases_a_better_candidate(
    tmp_path: Path, clean_champion: bytes
) -> None:
    world = World(FakeFleet({f"d{i}": "ok" for i in range(6)}), FakeReleaser(clean_champion))
    ctl = world.controller(tmp_path)
    assert isinstance(ctl.poll(), Decision)
    # The field data arrives while the drift is first seen: it is new data, so it triggers.
    world.fleet.states.update(d0="drift", d1="drift", d2="drift")
    drifted_field_data(tmp_path / "data")
    job = ctl.poll()
    assert isinstance(job, Job)
    assert job.stage == "released"
    assert job.gate is not None
    assert job.gate["candidate_window"] > job.gate["champion_window"]
    assert world.releaser.released == [(MODEL, "new_data")]
    assert world.trainer.calls == 1
    # The same drift polled again right after: the cooldown holds, nothing retrains.
    world.clock.now += 60
    ctl.poll()
    ctl.poll()
    assert world.trainer.calls == 1
    assert world.audit.outcomes() == ["started", "trained", "promote", "registered", "released"]


def test_a_candidate_no_better_than_the_champion_is_refused(
    tmp_path: Path, clean_champion: bytes
) -> None:
    fleet = FakeFleet({"d0": "drift", "d1": "drift", "d2": "ok"})
    world = World(fleet, FakeReleaser(clean_champion))
    ctl = world.controller(tmp_path)
    ctl.poll()
    job = ctl.poll()
    assert isinstance(job, Job)
    assert (job.stage, job.promote) == ("gated", False)
    assert world.releaser.released == []
    assert world.audit.outcomes()[-1] == "refused"


def test_one_noisy_device_starts_nothing(tmp_path: Path, clean_champion: bytes) -> None:
    world = World(FakeFleet({"d0": "drift", "d1": "ok", "d2": "ok"}), FakeReleaser(clean_champion))
    ctl = world.controller(tmp_path)
    for _ in range(5):
        decision = ctl.poll()
        assert isinstance(decision, Decision)
        assert decision.trigger is None
    assert world.trainer.calls == 0


def test_a_restart_after_training_resumes_at_the_gate(
    tmp_path: Path, clean_champion: bytes
) -> None:
    drifted_field_data(tmp_path / "data")

    class CrashAfterTraining(SmallTrainer):
        def __call__(self, out_dir: Path, data: tuple[Path, ...]) -> None:
            super().__call__(out_dir, data)
            raise SystemExit("killed after training")  # the process dies here

    fleet, releaser = FakeFleet({"d0": "drift", "d1": "drift"}), FakeReleaser(clean_champion)
    crashing = World(fleet, releaser, trainer=CrashAfterTraining())
    with pytest.raises(SystemExit):
        crashing.controller(tmp_path).poll()
    # The job was recorded before training; a new controller on the same state resumes it.
    restarted = World(fleet, releaser, audit=crashing.audit)
    job = restarted.controller(tmp_path).poll()
    assert isinstance(job, Job)
    assert job.stage == "released"
    # Training ran again (its outputs were never recorded), but the job started once.
    assert restarted.audit.outcomes().count("started") == 1


def test_a_restart_during_the_release_rolls_out_the_version_it_registered(
    tmp_path: Path, clean_champion: bytes
) -> None:
    drifted_field_data(tmp_path / "data")

    @dataclass
    class KilledDuringRelease(FakeReleaser):
        def release(self, model: str, version: int, reason: str) -> None:
            raise SystemExit("killed during the rollout")

    fleet = FakeFleet({"d0": "drift", "d1": "drift"})
    killed = KilledDuringRelease(clean_champion)
    crashing = World(fleet, killed)
    with pytest.raises(SystemExit):
        crashing.controller(tmp_path).poll()
    _, pending = crashing.controller(tmp_path).state_file.load()
    assert pending is not None
    assert (pending.stage, pending.version) == ("registered", 1)
    # The restarted controller shares the registry: the bytes are there once, as version 1.
    releaser = FakeReleaser(clean_champion, registered=killed.registered)
    restarted = World(fleet, releaser, audit=crashing.audit)
    job = restarted.controller(tmp_path).poll()
    assert isinstance(job, Job)
    assert (job.stage, job.version) == ("released", 1)
    assert len(releaser.registered) == 1
    assert releaser.versions == [1]
    assert restarted.trainer.calls == 0  # resumed after training, not from the start
    assert restarted.audit.outcomes().count("registered") == 1


def test_a_second_controller_on_the_same_work_folder_is_refused(tmp_path: Path) -> None:
    with work_dir_lock(tmp_path / "work"):
        with pytest.raises(PublisherError) as caught, work_dir_lock(tmp_path / "work"):
            pass
        assert caught.value.reason == Reason.LOCKED
        assert f"pid {os.getpid()}" in caught.value.message
        assert str(tmp_path / "work") in caught.value.message
    with work_dir_lock(tmp_path / "work"):  # released when the holder let go
        pass


def test_a_killed_controller_does_not_keep_the_work_folder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from deployment.retrain.controller import work_dir_lock\n"
            "with work_dir_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True); time.sleep(60)",
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(PublisherError, match=f"pid {holder.pid}"),
            work_dir_lock(tmp_path / "work"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    with work_dir_lock(tmp_path / "work"):  # the kernel dropped the dead holder's lock
        pass


def test_a_failing_pipeline_command_is_audited_and_the_controller_goes_on(
    tmp_path: Path, clean_champion: bytes
) -> None:
    drifted_field_data(tmp_path / "data")
    failing = CommandTrainer((sys.executable, "-c", "import sys; sys.exit('no GPU here')"))
    world = World(FakeFleet(), FakeReleaser(clean_champion), trainer=failing)
    ctl = world.controller(tmp_path)
    job = ctl.poll()
    assert isinstance(job, Job)
    assert job.stage == "failed"
    assert "exited 1: no GPU here" in world.audit.entries[-1][2]["error"]
    _, pending = ctl.state_file.load()
    assert pending is None


def test_a_pipeline_command_that_writes_no_model_fails_clearly(
    tmp_path: Path, clean_champion: bytes
) -> None:
    drifted_field_data(tmp_path / "data")
    silent = CommandTrainer((sys.executable, "-c", "print('done')"))
    world = World(FakeFleet(), FakeReleaser(clean_champion), trainer=silent)
    job = world.controller(tmp_path).poll()
    assert isinstance(job, Job)
    assert job.stage == "failed"
    assert "wrote no model.onnx" in world.audit.entries[-1][2]["error"]


@pytest.mark.parametrize(("rows", "train", "window"), [(10, 7, 3), (3, 2, 1), (1, 0, 1)])
def test_split_window_keeps_the_newest_rows_for_the_gate(
    rows: int, train: int, window: int
) -> None:
    x = np.arange(rows * 6, dtype=np.float32).reshape(rows, 6)
    y = np.arange(rows)
    (tx, _), (wx, wy) = split_window(x, y)
    assert (len(tx), len(wx)) == (train, window)
    assert list(wy) == list(range(train, rows))


@pytest.mark.parametrize(("flag", "allowed"), [((), False), (("--allow-no-traffic",), True)])
def test_watch_takes_the_gate_flag_for_devices_without_traffic(
    flag: tuple[str, ...], allowed: bool
) -> None:
    """A retrained release passes the same gate as `release`: quiet devices only when asked."""
    argv = ["watch", "--name", "m", "--data-dir", "d", "--work-dir", "w", "--rings", "canary"]
    args = cli_parser().parse_args([*argv, *flag])
    assert args.allow_no_traffic is allowed

"""The training verbs `train`, `gate` and `watch` (their arguments: `commands`)."""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from rich.console import Console

from deployment.errors import PublisherError, Reason
from deployment.publish import gate, rollout
from deployment.publish.publisher import Publisher, Services
from deployment.publish.registry import CHAMPION
from deployment.retrain.controller import (
    CommandTrainer,
    Controller,
    ControllerConfig,
    PipelineTrainer,
    Trainer,
    judge_candidate,
    work_dir_lock,
)
from deployment.retrain.pipeline import (
    BASELINE_FILE,
    HOLDOUT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PipelineConfig,
    Tracker,
    load_labelled,
    read_outputs,
    run_pipeline,
)
from deployment.retrain.policy import Decision, RetrainPolicy

log = structlog.get_logger(__name__)

EXPERIMENT = "edge-sensor_classifier"


def dispatch(
    args: argparse.Namespace, services: Services, publisher: Publisher, out: Console
) -> None:
    if args.command == "train":
        _train(args, services, out)
    elif args.command == "gate":
        _gate(args, services, out)
    else:
        _watch(args, services, publisher, out)


def tracker_for(services: Services) -> Tracker:
    return Tracker(
        services.resolved.mlflow_tracking_uri,
        EXPERIMENT,
        services.resolved.audit_log.parent / "mlruns",
    )


def _train(args: argparse.Namespace, services: Services, out: Console) -> None:
    config = PipelineConfig(args.out, seed=args.seed, rows=args.rows, data=tuple(args.data))
    result = run_pipeline(config, tracker_for(services))
    services.audit.append(
        "train", EXPERIMENT, "trained", sha256=result.sha256, run_id=result.run_id, **result.metrics
    )
    out.print(f"trained {result.model_path} sha256={result.sha256} run={result.run_id}")
    for name, value in sorted(result.metrics.items()):
        out.print(f"  {name} = {value:.4f}", markup=False)


def _champion(services: Services, name: str) -> bytes | None:
    registry = services.registry()
    version = registry.alias_version(name, CHAMPION)
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        return registry.model_file(registry.entry(name, version), Path(folder)).read_bytes()


def _gate(args: argparse.Namespace, services: Services, out: Console) -> None:
    rollout.check_model_name(args.name)
    candidate, _, _ = read_outputs(args.candidate)
    champion = _champion(services, args.name)
    if champion is None:
        out.print(f"no champion of {args.name} yet: the candidate passes on its own metrics")
        return
    holdout = load_labelled(args.candidate / HOLDOUT_FILE)
    window = load_labelled(args.window) if args.window else holdout
    policy = RetrainPolicy(min_gain=args.min_gain, max_holdout_loss=args.max_holdout_loss)
    result = judge_candidate(candidate, champion, window, holdout, policy)
    services.audit.append("gate", args.name, result.reason, **vars(result))
    out.print(
        f"gate {result.reason}: recent data {result.candidate_window:.3f} against"
        f" {result.champion_window:.3f}, holdout {result.candidate_holdout:.3f} against"
        f" {result.champion_holdout:.3f}"
    )
    if not result.promote:
        raise PublisherError(Reason.GATE_FAILED, f"candidate refused: {result.reason}")


@dataclass
class PublisherReleaser:
    """The controller's hand-off to the publisher: register, upload, sign, roll out."""

    services: Services
    publisher: Publisher
    rings: list[str]
    bounds: gate.GateBounds

    def champion(self, model: str) -> bytes | None:
        return _champion(self.services, model)

    def register(self, model: str, out_dir: Path) -> int:
        baseline = out_dir / BASELINE_FILE
        entry = self.publisher.register(
            out_dir / MODEL_FILE,
            name=model,
            metrics_path=out_dir / METRICS_FILE,
            baseline=baseline if baseline.exists() else None,
            run_id=None,
            version=None,
        )
        return entry.version

    def release(self, model: str, version: int, reason: str) -> None:
        # Each step is repeatable: an upload already done is recognised, a rollout resumes
        # from the audit log, so a restarted controller can run them all again.
        ref = f"{model}:{version}"
        self.publisher.upload(ref)
        self.publisher.sign(ref, url=None, valid_hours=None)
        self.publisher.release(ref, self.rings, self.bounds, dry_run=False)
        log.info("retrain_released", model=model, version=version, trigger=reason)


def _watch(
    args: argparse.Namespace, services: Services, publisher: Publisher, out: Console
) -> None:
    policy = RetrainPolicy(
        schedule_s=args.schedule_hours * 3600 if args.schedule_hours else None,
        cooldown_s=args.cooldown_minutes * 60,
        min_drifting_devices=args.min_devices,
        min_drifting_share=args.min_share,
        sustain_polls=args.sustain,
        retrain_on_new_data=args.on_new_data,
    )
    trainer: Trainer = (
        CommandTrainer(tuple(shlex.split(args.pipeline_command)))
        if args.pipeline_command
        else PipelineTrainer(tracker_for(services))
    )
    releaser = PublisherReleaser(
        services,
        publisher,
        args.rings,
        gate.GateBounds(timeout_s=args.gate_timeout, allow_no_traffic=args.allow_no_traffic),
    )
    controller = Controller(
        ControllerConfig(
            model=args.name,
            module=services.resolved.env.module,
            data_dir=args.data_dir,
            work_dir=args.work_dir,
            policy=policy,
        ),
        fleet=services.hub(),
        trainer=trainer,
        releaser=releaser,
        audit=services.audit,
    )
    with work_dir_lock(args.work_dir):
        while True:
            outcome = controller.poll()
            if isinstance(outcome, Decision):
                out.print(f"watch: {outcome.hold}", markup=False)
            else:
                out.print(f"watch: job {outcome.trigger} ended at {outcome.stage}", markup=False)
            if args.once:
                return
            time.sleep(args.interval)

"""The training side of the command line: `train`, `gate` and `watch` (the retraining controller).

They share the publisher's environments: the MLflow tracking URI, the audit log, the hub and the
rings all come from the same config file, so a retrained model is registered, signed and rolled
out exactly as a hand-published one is. The verbs live in `verbs`, imported only when one runs:
they pull in MLflow and scikit-learn, seconds of start-up every other command would pay.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from deployment.retrain.policy import RetrainPolicy

if TYPE_CHECKING:
    from rich.console import Console

    from deployment.publish.publisher import Publisher, Services


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    positive: Callable[[type[float] | type[int]], Callable[[str], float | int]],
    fraction: Callable[[str], float],
    rings: Callable[[str], list[str]],
) -> None:
    train = commands.add_parser("train", help="run the example pipeline, tracked in MLflow")
    train.add_argument("--out", type=Path, required=True, help="folder for model.onnx etc.")
    train.add_argument("--data", type=Path, action="append", default=[], help="labelled data")
    train.add_argument("--seed", type=int, default=7)
    train.add_argument("--rows", type=positive(int), default=3000)

    gate = commands.add_parser("gate", help="candidate vs the champion; exit 1 if not better")
    gate.add_argument("candidate", type=Path, help="a pipeline's output folder")
    gate.add_argument("--name", required=True, help="registered model name")
    gate.add_argument("--window", type=Path, help="recent labelled data (.csv/.npz)")
    gate.add_argument("--min-gain", type=float, default=RetrainPolicy.min_gain)
    gate.add_argument("--max-holdout-loss", type=float, default=RetrainPolicy.max_holdout_loss)

    watch = commands.add_parser("watch", help="the retraining controller")
    watch.add_argument("--name", required=True, help="registered model name")
    watch.add_argument("--data-dir", type=Path, required=True, help="labelled data arrives here")
    watch.add_argument("--work-dir", type=Path, required=True, help="candidates and state")
    watch.add_argument("--rings", type=rings, required=True, help="release rings, in order")
    watch.add_argument("--interval", type=positive(float), default=60.0, help="seconds per poll")
    watch.add_argument("--once", action="store_true", help="one poll, then exit")
    watch.add_argument("--schedule-hours", type=positive(float))
    watch.add_argument("--cooldown-minutes", type=float, default=60.0)
    watch.add_argument("--min-devices", type=positive(int), default=2)
    watch.add_argument("--min-share", type=fraction, default=0.2)
    watch.add_argument("--sustain", type=positive(int), default=2, help="polls in a row")
    watch.add_argument(
        "--no-new-data-trigger",
        dest="on_new_data",
        action="store_false",
        help="data arriving waits for drift or the schedule instead of starting a retraining",
    )
    watch.add_argument(
        "--command",
        # Not `command`: that destination names the subcommand the CLI dispatches on.
        dest="pipeline_command",
        help="your own pipeline: a command line with {out} for its output folder",
    )
    watch.add_argument("--gate-timeout", type=positive(float), default=900.0)
    watch.add_argument(
        "--allow-no-traffic",
        action="store_true",
        help="a ring's gate accepts devices that saw no traffic during probation",
    )


COMMANDS = frozenset({"train", "gate", "watch"})


def dispatch(
    args: argparse.Namespace, services: Services, publisher: Publisher, out: Console
) -> None:
    from deployment.retrain import verbs  # noqa: PLC0415 - see the module's docstring

    verbs.dispatch(args, services, publisher, out)

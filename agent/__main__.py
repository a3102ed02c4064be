"""`python -m agent serve --model PATH`: the agent standalone, without a hub.

`python -m agent profile MODEL.onnx --target-rps N`: sweep the agent's knobs on this machine
and recommend settings and container resources (writes `profile.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from agent.logs import configure_logging
from agent.observation.limits import read_limits
from agent.observation.recommend import Target
from agent.profiler import SweepPlan, knob_grid, run_profile, summary_lines
from agent.settings import AgentSettings
from agent.standalone import build_app, run_process
from wire.reasons import AgentError
from wire.version import version_text

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent", description=__doc__)
    parser.add_argument("--version", action="version", version=version_text("agent"))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve one ONNX model over Open Inference Protocol v2 (HTTP) with /metrics",
        description="Settings not given as flags come from EDGEML_* environment variables.",
    )
    serve.add_argument(
        "--model",
        type=Path,
        help="serve this ONNX file as is (EDGEML_MODEL_PATH); without it, models come from "
        "the store (EDGEML_STATE_DIR) and signed releases in EDGEML_WATCH_DIR",
    )
    serve.add_argument("--state-dir", type=Path, help="model store volume (EDGEML_STATE_DIR)")
    serve.add_argument("--watch-dir", type=Path, help="release folder (EDGEML_WATCH_DIR)")
    serve.add_argument("--name", help="served model name; default: the file stem")
    serve.add_argument("--host", help="address to bind (EDGEML_HOST, default 0.0.0.0)")
    serve.add_argument("--http-port", type=int, help="OIP v2 port (default 8000)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 9600)")
    _profile_arguments(
        commands.add_parser(
            "profile",
            help="measure a model under the agent's settings; recommend settings and limits",
            description="Each configuration runs in a fresh `agent serve` child process on "
            "this machine (run it on the target hardware, in the device image). Progress goes "
            "to stderr; the result to --out.",
        )
    )
    return parser


def _numbers(kind: type[int] | type[float], low: float) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: comma-separated numbers, each at least `low`."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
        if not values or any(not value >= low for value in values):
            raise argparse.ArgumentTypeError(f"{text!r}: each value must be at least {low:g}")
        return values

    return parse


def _switches(text: str) -> tuple[bool, ...]:
    words = {"on": True, "off": False}
    values = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not values or any(value not in words for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of on/off")
    return tuple(words[value] for value in values)


def _profile_arguments(profile: argparse.ArgumentParser) -> None:
    profile.add_argument("model", type=Path, help="the ONNX file to profile")
    profile.add_argument("--target-rps", type=float, required=True, help="requests/s to serve")
    profile.add_argument("--max-p99-ms", type=float, default=100.0, help="p99 budget (ms)")
    profile.add_argument(
        "--threads", type=_numbers(int, 1), help="intra-op threads to try (default: 1 .. CPUs)"
    )
    profile.add_argument("--max-batch", type=_numbers(int, 1), default=(8, 32))
    profile.add_argument("--worker-threads", type=_numbers(int, 1), default=(1,))
    profile.add_argument("--coalescing", type=_switches, default=(True, False), help="on,off")
    profile.add_argument(
        "--loads",
        type=_numbers(float, 0.01),
        default=(0.5, 1.0, 1.5),
        help="offered loads as fractions of --target-rps (default 0.5,1,1.5)",
    )
    profile.add_argument("--warmup", type=float, default=1.0, help="unmeasured s per load")
    profile.add_argument("--duration", type=float, default=4.0, help="measured s per load")
    profile.add_argument("--memory-headroom", type=float, default=0.2, help="fraction added")
    profile.add_argument("--cpu-headroom", type=float, default=0.25, help="fraction added")
    profile.add_argument("--out", type=Path, default=Path("profile.json"))
    profile.add_argument("--json", action="store_true", help="print the document on stdout")


def _profile(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        print(f"agent profile: {args.model} is not a file", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = Target(
            args.target_rps,
            args.max_p99_ms,
            memory_headroom=args.memory_headroom,
            cpu_headroom=args.cpu_headroom,
        )
        threads = args.threads or tuple(range(1, max(1, int(read_limits().cpus)) + 1))
        plan = SweepPlan(
            knob_grid(threads, args.max_batch, args.worker_threads, args.coalescing),
            loads_rps=tuple(round(args.target_rps * f, 3) for f in args.loads),
            warmup_s=args.warmup,
            measure_s=args.duration,
            swap_rps=args.target_rps,
        )
    except ValueError as error:  # the target or the plan
        print(f"agent profile: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        document = run_profile(args.model, plan, target)
    except (AgentError, ValueError) as error:  # a model it cannot serve, nothing measured
        print(f"agent profile: {error}", file=sys.stderr)
        return 1
    written = document.document()
    args.out.write_text(json.dumps(written, indent=2) + "\n")
    if args.json:
        print(json.dumps(written))
    else:
        print("\n".join(summary_lines(document)))
    print(f"agent profile: wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "profile":
        return _profile(args)
    try:
        settings = AgentSettings.from_environment(
            overrides={
                "model_path": args.model,
                "model_name": args.name,
                "host": args.host,
                "http_port": args.http_port,
                "metrics_port": args.metrics_port,
                "state_dir": args.state_dir,
                "watch_dir": args.watch_dir,
            }
        )
    except (ValueError, ValidationError) as error:
        print(f"agent: invalid settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log.log_level, settings.log.log_format)
    return run_process(lambda: build_app(settings), "agent")


if __name__ == "__main__":
    sys.exit(main())

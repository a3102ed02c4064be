"""`python -m agent serve --model PATH`: the agent standalone, without a hub."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from agent.logs import configure_logging
from agent.settings import AgentSettings
from agent.standalone import build_app, run_process

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent", description=__doc__)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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

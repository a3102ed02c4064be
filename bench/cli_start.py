"""How long the cloud CLI takes to start: what a user waits for on every command.

    python -m bench.cli_start [--runs 15]

Median wall time of N runs each of ``python -m deployment keygen --help`` and
``python -m deployment --help``, against ``python -c pass`` (the interpreter alone) measured in
the same run, interleaved so that a busy moment on a shared machine falls on all three alike.
Last line: the JSON object written to bench/results/cli_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "cli_start.json"
GOAL_S = 1.0

COMMANDS: dict[str, list[str]] = {
    "python_pass": [sys.executable, "-c", "pass"],
    "keygen_help": [sys.executable, "-m", "deployment", "keygen", "--help"],
    "help": [sys.executable, "-m", "deployment", "--help"],
}


def _once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(runs: int) -> dict[str, Any]:
    # The current tree first on the path, as `python -m` from the checkout resolves it.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p
    )
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():  # warm the file cache; not counted
        _once(argv)
    for _ in range(runs):
        for name, argv in COMMANDS.items():
            samples[name].append(_once(argv))
    medians = {name: round(statistics.median(values), 3) for name, values in samples.items()}
    return {
        "setup": {"runs": runs, "python": platform.python_version(), "cpus": os.cpu_count()},
        "python_pass_s": medians["python_pass"],
        "keygen_help_s": medians["keygen_help"],
        "help_s": medians["help"],
        "keygen_help_over_python_s": round(medians["keygen_help"] - medians["python_pass"], 3),
        "goal_s": GOAL_S,
        "under_goal": medians["keygen_help"] < GOAL_S and medians["help"] < GOAL_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    result = measure(args.runs)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

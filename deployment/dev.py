"""`python -m deployment dev up|status|down`: a local simulated fleet to publish to.

The fleet is assembled by `demo.dev` from the simulator, the agent module and this package's
environments file; the import contracts keep the cloud side from importing the simulator or the
demo, so this command runs it as a process of the same interpreter and hands its output on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import TextIO


def run(argv: Sequence[str], *, stdout: TextIO, stderr: TextIO) -> int:
    completed = subprocess.run(  # noqa: S603 -- this interpreter, a module of this project
        [sys.executable, "-m", "demo.dev", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    stdout.write(completed.stdout)
    stderr.write(completed.stderr)
    return completed.returncode

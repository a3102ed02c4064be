"""Offline profile (`python -m agent profile MODEL.onnx`): the agent's knobs swept on this machine.

Each configuration runs in a fresh `python -m agent serve` child process (`child`), so its peak
memory is its own and no allocator state carries over from the previous configuration. The
child runs in managed mode with a release folder: the model goes through the real install path
(`release`: verified manifest signed by a key made for the run, store, load, warm-up, switch)
and is served through the real HTTP path. `load` offers it open-loop load, `measure` takes the
readings per configuration and sweeps the grid of `plan`, `report` writes `profile.json`
(`wire.profile`) with the recommendation (`agent.observation.recommend`) and reads it back.

Peak memory is the kernel's high-water mark (`VmHWM`), reset before each window through
`/proc/<pid>/clear_refs`, checked against RSS sampled every few milliseconds; where the reset
is refused the sampled maximum stands alone. The load generator runs in this process, on the
same machine: its CPU is not the child's, but it competes for the same cores.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from agent.observation.limits import read_limits
from agent.observation.recommend import Target
from agent.profiler.child import Child, ChildError, running_child
from agent.profiler.load import Window, http_client, offer_load
from agent.profiler.measure import Measurement, profile_configuration, sweep
from agent.profiler.plan import SweepPlan, knob_grid
from agent.profiler.release import Release
from agent.profiler.report import (
    SCHEMA,
    ProfiledModel,
    ProfileDocument,
    read_profile,
    report,
    summary_lines,
)
from wire.profile import Profile

__all__ = [
    "SCHEMA",
    "Child",
    "ChildError",
    "Measurement",
    "ProfileDocument",
    "ProfiledModel",
    "Release",
    "SweepPlan",
    "Window",
    "http_client",
    "knob_grid",
    "offer_load",
    "profile_configuration",
    "read_profile",
    "report",
    "run_profile",
    "running_child",
    "summary_lines",
    "sweep",
]


def run_profile(
    model_path: Path, plan: SweepPlan, target: Target, progress: TextIO | None = None
) -> Profile:
    """Profile `model_path` on this machine and return the `profile.json` document."""
    progress = progress or sys.stderr
    model = ProfiledModel(model_path.name, model_path.read_bytes())
    runs = asyncio.run(sweep(model.data, plan, progress))
    return report(model, runs, target, limits=read_limits(), plan=plan)

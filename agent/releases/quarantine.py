"""Quarantine: a candidate model is loaded, checked and run first in a short-lived child process.

A 200-byte signed model can allocate gigabytes at its first run (`ConstantOfShape` to 4 GiB:
ONNX Runtime skips constant folding above 1 GiB) or loop for hours. Run in the serving
process, that kills the agent (OOM killer) or starves it. The child runs the same load,
contract check, golden sample and warm-up under hard limits:

* `RLIMIT_DATA` (private writable memory: heap and anonymous mappings) at what the child uses
  once ONNX Runtime is imported plus the budget, so an oversized allocation fails inside the
  child instead of being overcommitted and faulted in; the child also volunteers to the OOM
  killer first (`oom_score_adj` 1000) in case the container's limit is nearer than the budget;
* `RLIMIT_CPU` (SIGXCPU at the soft limit, SIGKILL at the hard one);
* a wall-clock deadline in the parent, which kills the child.

The child answers with one JSON line on stdout. Only a candidate that passed is loaded in the
serving process, which then reuses the cost the child measured instead of timing it again.

`python -m agent.releases.quarantine` is the child; it reads its job as JSON on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Final

import structlog
from pydantic import Field, ValidationError

from agent.config import Section
from agent.observation.limits import read_memory_free
from agent.releases.lifecycle import (
    SwapError,
    golden_arrays,
    golden_mismatches,
)
from agent.releases.manifest import ReleaseManifest
from agent.serving.engine import (
    CostModel,
    GraphOptimization,
    LoadedModel,
    RuntimeOptions,
    load_model,
)
from wire.base import LaxWireModel
from wire.reasons import AgentError, Reason

log = structlog.get_logger(__name__)

CHILD_MODULE: Final = "agent.releases.quarantine"
CHILD_NICENESS: Final = 10  # the loader thread's: a candidate must not take the loop's core
# The budget a candidate gets when the container sets no memory limit.
DEFAULT_MEMORY_BYTES: Final = 1 << 30
# Under a container limit: this share of what the container still has free (the serving
# process must later load the same model beside the active one) ...
CGROUP_FREE_SHARE: Final = 0.5
# ... but never less than this: ONNX Runtime needs some room for any model at all.
MIN_MEMORY_BYTES: Final = 64 << 20
_REPORT_LIMIT: Final = 64 << 10  # bytes of the child's stdout / stderr kept
_OUT_OF_MEMORY_MARKERS: Final = ("failed to allocate memory", "bad_alloc", "memoryerror")


# --- pure values ---------------------------------------------------------------------------


class QuarantineSettings(Section):
    """Whether candidates are quarantined, and what one may use in its child."""

    enabled: bool = Field(True, alias="quarantine")
    # A child kept started ahead of need (see `Quarantine`): ~90 MiB resident while it waits.
    spare: bool = Field(True, alias="quarantine_spare")
    # Memory a candidate may allocate beyond the runtime's own; unset: derived from the
    # container's limit (`memory_budget`).
    memory_bytes: int | None = Field(None, ge=MIN_MEMORY_BYTES, alias="quarantine_memory_bytes")
    cpu_s: int = Field(60, ge=1, le=3600, alias="quarantine_cpu_s")
    wall_s: float = Field(120.0, gt=0.0, le=7200.0, alias="quarantine_wall_s")


@dataclass(frozen=True, slots=True)
class Passed:
    """The candidate loaded, met its contract and golden sample and ran at every batch size."""

    cost: CostModel
    seconds: float


@dataclass(frozen=True, slots=True)
class Refused:
    """The candidate failed in quarantine: the release fails with `reason`."""

    reason: Reason
    message: str
    seconds: float


QuarantineResult = Passed | Refused


def memory_budget(memory_free: int | None, configured: int | None) -> int:
    """The child's memory budget: the setting if given, else a share of what the container
    has free, else `DEFAULT_MEMORY_BYTES`; never below `MIN_MEMORY_BYTES`."""
    if configured is not None:
        return max(configured, MIN_MEMORY_BYTES)
    if memory_free is None:
        return DEFAULT_MEMORY_BYTES
    return max(int(memory_free * CGROUP_FREE_SHARE), MIN_MEMORY_BYTES)


def classify_exit(
    returncode: int | None, stdout: bytes, stderr: bytes, *, timed_out: bool, seconds: float
) -> QuarantineResult:
    """The verdict from how the child ended and what it printed."""
    if timed_out:
        return Refused(
            Reason.LOAD_TIMEOUT, "candidate did not finish within its wall-clock limit", seconds
        )
    if returncode == 0:
        return _from_report(stdout, seconds)
    if returncode is not None and returncode < 0:
        reason, message = _from_signal(-returncode, stderr.decode(errors="replace"))
        return Refused(reason, message, seconds)
    return Refused(Reason.LOAD_FAILED, f"quarantine child exited with status {returncode}", seconds)


def _from_report(stdout: bytes, seconds: float) -> QuarantineResult:
    try:
        report = _ChildReport.model_validate_json(stdout.strip().splitlines()[-1])
    except (ValidationError, IndexError):
        return Refused(Reason.LOAD_FAILED, "quarantine child gave no valid report", seconds)
    if report.passed and report.cost is not None:
        return Passed(CostModel(**report.cost), seconds)
    try:
        reason = Reason(report.reason or Reason.LOAD_FAILED)
    except ValueError:
        reason = Reason.LOAD_FAILED
    return Refused(reason, report.message[:500], seconds)


def _from_signal(signum: int, stderr: str) -> tuple[Reason, str]:
    if signum == signal.SIGXCPU:
        return Reason.LOAD_TIMEOUT, "candidate used up its CPU-time limit"
    if signum == signal.SIGKILL:
        # Not by us (that is a timeout): the OOM killer or RLIMIT_CPU's hard limit.
        return Reason.RESOURCE_LIMIT, "candidate was killed (out of memory or CPU)"
    name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
    if is_out_of_memory(stderr):
        return Reason.RESOURCE_LIMIT, f"candidate ran out of memory ({name})"
    return Reason.LOAD_FAILED, f"candidate crashed its runtime ({name})"


def is_out_of_memory(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _OUT_OF_MEMORY_MARKERS)


# --- the job, both sides -------------------------------------------------------------------


class _Job(LaxWireModel):
    model_path: str
    manifest: str  # ReleaseManifest as JSON (verified by the parent; re-parsed, not re-verified)
    intra_op_threads: int | None = Field(ge=1)  # None: from the container's CPU limit
    inter_op_threads: int = Field(ge=1)
    optimization: GraphOptimization
    max_rows: int = Field(ge=1)
    memory_bytes: int = Field(ge=MIN_MEMORY_BYTES)
    cpu_seconds: int = Field(ge=1)


class _ChildReport(LaxWireModel):
    passed: bool
    cost: dict[str, float] | None = None
    reason: str | None = None
    message: str = ""


def verify_candidate(model: LoadedModel, manifest: ReleaseManifest) -> None:
    """The manifest's contract and golden sample against a loaded model; raises `SwapError`."""
    differences = manifest.contract.differences(model.contract)
    if differences:
        raise SwapError(
            Reason.CONTRACT_MISMATCH,
            "model differs from its manifest: " + "; ".join(differences[:5]),
        )
    if manifest.golden is None:
        return
    inputs = golden_arrays(manifest.golden.inputs)
    expected = golden_arrays(manifest.golden.outputs)
    try:
        produced = model.run(inputs, list(expected))
    except Exception as error:  # ORT rejects the golden input: the model cannot run it
        message = str(error).strip()[:200]
        if is_out_of_memory(message):
            raise SwapError(Reason.RESOURCE_LIMIT, f"golden run: {message}") from error
        raise SwapError(Reason.GOLDEN_MISMATCH, f"golden input failed: {message}") from error
    problems = golden_mismatches(
        expected, dict(zip(expected, produced, strict=True)), manifest.golden.atol
    )
    if problems:
        raise SwapError(Reason.GOLDEN_MISMATCH, "; ".join(problems[:5]))


def _private_data_bytes() -> int:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmData in /proc/self/status")


def _confine(job: _Job) -> None:
    """Limits for this (child) process: memory beyond the runtime's own, CPU, priority."""
    data = _private_data_bytes() + job.memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (data, data))
    resource.setrlimit(resource.RLIMIT_CPU, (job.cpu_seconds, job.cpu_seconds + 2))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write gigabytes
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)


def _run_job(job: _Job) -> _ChildReport:
    manifest = ReleaseManifest.model_validate_json(job.manifest)
    options = RuntimeOptions(
        intra_op_threads=job.intra_op_threads,
        inter_op_threads=job.inter_op_threads,
        optimization=job.optimization,
    )
    data = Path(job.model_path).read_bytes()
    _confine(job)
    try:
        model = load_model(
            data,
            name=manifest.name,
            version=manifest.version,
            sha256=manifest.sha256,
            options=options,
            max_rows=job.max_rows,
        )
        verify_candidate(model, manifest)
    except AgentError as error:  # ModelLoadError (a failed warm-up too), SwapError
        reason = Reason.RESOURCE_LIMIT if is_out_of_memory(error.message) else error.reason
        return _ChildReport(passed=False, reason=reason.value, message=error.message)
    except MemoryError:
        return _ChildReport(
            passed=False, reason=Reason.RESOURCE_LIMIT.value, message="out of memory"
        )
    return _ChildReport(passed=True, cost=asdict(model.cost))


def child_main(stdin: IO[str], stdout: IO[str]) -> int:
    """The child: one job from stdin, one report line on stdout; end-of-file alone (the agent
    stopped or died while this child was its spare) is a quiet exit."""
    text = stdin.read()
    if not text.strip():
        return 0
    job = _Job.model_validate_json(text)
    report = _run_job(job)
    stdout.write(report.model_dump_json() + "\n")
    stdout.flush()
    return 0


# --- the parent side -----------------------------------------------------------------------


class Quarantine:
    """Runs candidates in child processes; `check` never raises for anything the model does.

    With `spare`, one child is started ahead of need and waits for its job with Python and
    ONNX Runtime already imported (about a second of CPU on a small device, more than loading
    most models): a swap then pays only for the candidate's own load and runs. Each child takes
    exactly one job; the next spare is started once the check is over.
    """

    def __init__(
        self,
        settings: QuarantineSettings,
        *,
        memory_free: Callable[[], int | None] = read_memory_free,
        command: Sequence[str] = (sys.executable, "-m", CHILD_MODULE),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._keep_spare = settings.spare
        self._memory_free = memory_free
        self._command = tuple(command)
        self._clock = clock
        self._spare: asyncio.Task[asyncio.subprocess.Process] | None = None

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own session: a signal to the agent's process group does not reach it. If
            # the agent dies, the child reads end-of-file on stdin and exits.
            start_new_session=True,
        )

    def prepare(self) -> None:
        """Start a spare child now (on the event loop), if spares are on and none is there."""
        if self._keep_spare and self._spare is None:
            self._spare = asyncio.get_running_loop().create_task(self._spawn())

    async def _child(self) -> asyncio.subprocess.Process:
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(OSError):
                child = await spare
                if child.returncode is None:
                    return child
        return await self._spawn()

    async def close(self) -> None:
        """Stop the spare child, if any."""
        spare, self._spare = self._spare, None
        if spare is None:
            return
        spare.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            child = await spare
            if child.returncode is None:
                child.kill()
            await child.wait()

    async def check(
        self, model_path: Path, manifest: ReleaseManifest, runtime: RuntimeOptions, max_rows: int
    ) -> QuarantineResult:
        job = _Job(
            model_path=str(model_path),
            manifest=manifest.model_dump_json(by_alias=True),
            intra_op_threads=runtime.intra_op_threads,
            inter_op_threads=runtime.inter_op_threads,
            optimization=runtime.optimization,
            max_rows=max_rows,
            # At each check: what the container has free changes with the models it holds.
            memory_bytes=memory_budget(self._memory_free(), self.settings.memory_bytes),
            cpu_seconds=self.settings.cpu_s,
        )
        started = self._clock()
        child = await self._child()
        timed_out = False
        try:
            async with asyncio.timeout(self.settings.wall_s):
                stdout, stderr = await child.communicate(job.model_dump_json().encode())
        except TimeoutError:
            timed_out = True
            stdout = stderr = b""
        finally:
            if child.returncode is None:  # timed out, or the install was cancelled
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                # Reaped even when cancelled: no zombie per superseded release.
                await asyncio.shield(child.wait())
            self.prepare()
        result = classify_exit(
            child.returncode,
            stdout[-_REPORT_LIMIT:],
            stderr[-_REPORT_LIMIT:],
            timed_out=timed_out,
            seconds=self._clock() - started,
        )
        log.info(
            "quarantine_done",
            model=manifest.name,
            version=manifest.version,
            passed=isinstance(result, Passed),
            reason=result.reason if isinstance(result, Refused) else None,
            seconds=round(result.seconds, 3),
            returncode=child.returncode,
        )
        return result


if __name__ == "__main__":
    sys.exit(child_main(sys.stdin, sys.stdout))

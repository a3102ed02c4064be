"""A ring's gate: what each device's reported entry says about the release, whether enough
devices passed, and the progress lines a person reads while it waits. Pure."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wire.reported import ModelEntry, ProbationEntry, read_entry
from wire.states import FAILED_STATES, DriftState, ModelState, ProbationState


@dataclass(frozen=True)
class GateBounds:
    min_fraction: float = 1.0  # of the targeted devices that must pass
    max_error_rate: float = 0.05
    max_p99_ratio: float = 3.0
    timeout_s: float = 900.0
    poll_s: float = 5.0
    # A probation that ended without its minimum of requests (`passed_without_traffic`) shows
    # nothing about the release: refused unless the operator accepts it (`--allow-no-traffic`).
    allow_no_traffic: bool = False


@dataclass(frozen=True)
class DeviceVerdict:
    device_id: str
    outcome: str  # passed | failed | pending
    reason: str = ""
    without_traffic: bool = False  # passed on a probation that saw no traffic (allowed)


def judge_device(
    device_id: str, reported: Mapping[str, Any] | None, version: int, bounds: GateBounds
) -> DeviceVerdict:
    """One agent's reported ``models.<name>`` against the release (pure)."""
    entry = read_entry(reported, ModelEntry)
    if entry is None or entry.version != version:
        return DeviceVerdict(device_id, "pending", "not reporting this version yet")
    problem = _problem(entry, version, bounds)
    if problem:
        return DeviceVerdict(device_id, "failed", problem)
    probation = entry.probation.state if entry.probation else None
    if entry.state is ModelState.ACTIVE and probation is ProbationState.PASSED:
        return DeviceVerdict(device_id, "passed")
    if entry.state is ModelState.ACTIVE and probation is ProbationState.PASSED_WITHOUT_TRAFFIC:
        if bounds.allow_no_traffic:
            return DeviceVerdict(device_id, "passed", "saw no traffic", without_traffic=True)
        requests = entry.probation.requests if entry.probation else None
        return DeviceVerdict(
            device_id,
            "failed",
            f"saw no traffic during probation ({requests} requests, "
            f"{ProbationState.PASSED_WITHOUT_TRAFFIC}); release with --allow-no-traffic to "
            "accept that",
        )
    return DeviceVerdict(device_id, "pending", f"{entry.state}, probation {probation}")


def _over(value: float | None, bound: float) -> bool:
    return value is not None and value > bound


def _problem(entry: ModelEntry, version: int, bounds: GateBounds) -> str:
    """Why a device that reports the release fails the gate ('' when it does not)."""
    probation = entry.probation or ProbationEntry(state=ProbationState.WATCHING)
    drift = entry.drift
    checks = (
        (entry.state in FAILED_STATES, f"{entry.state}: {entry.reason or ''}"),
        (probation.state is ProbationState.FAILED, "probation failed"),
        (_over(probation.error_rate, bounds.max_error_rate), f"error rate {probation.error_rate}"),
        (_over(probation.p99_ratio, bounds.max_p99_ratio), f"p99 ratio {probation.p99_ratio}"),
        # Until the release serves, the drift section is the previous release's watch.
        (
            drift is not None and drift.version == version and drift.state is DriftState.DRIFT,
            "drift alarm",
        ),
    )
    return next((why for failed, why in checks if failed), "")


@dataclass(frozen=True)
class GateResult:
    outcome: str  # passed | failed | waiting
    required: int
    passed: int
    failed: tuple[DeviceVerdict, ...] = ()
    pending: int = 0
    without_traffic: int = 0  # of `passed`: devices whose probation saw no traffic


def judge_gate(verdicts: Iterable[DeviceVerdict], required: int) -> GateResult:
    """Failed as soon as one device fails; passed once ``required`` devices passed (pure)."""
    items = list(verdicts)
    failed = tuple(v for v in items if v.outcome == "failed")
    passed = sum(1 for v in items if v.outcome == "passed")
    pending = sum(1 for v in items if v.outcome == "pending")
    quiet = sum(1 for v in items if v.outcome == "passed" and v.without_traffic)
    if failed:
        outcome = "failed"
    elif passed >= required:
        outcome = "passed"
    else:
        outcome = "waiting"
    return GateResult(outcome, required, passed, failed, pending, quiet)


def required_devices(targeted: int, min_fraction: float) -> int:
    return max(1, math.ceil(targeted * min_fraction - 1e-9)) if targeted else 0


PROGRESS_INTERVAL_S = 1.0  # a gate's progress line at most this often


def gate_line(
    ring: str,
    targeted: int,
    version: int,
    reports: Iterable[Mapping[str, Any] | None],
    result: GateResult,
) -> str:
    """``canary: 1/2 active, probation 12 requests, 0/1 passed`` (pure): how far the
    devices the gate waits for are. Requests are summed over the devices in probation."""
    entries = [e for e in (read_entry(r, ModelEntry) for r in reports) if e is not None]
    current = [e for e in entries if e.version == version]
    active = sum(1 for e in current if e.state is ModelState.ACTIVE)
    counts = [e.probation.requests for e in current if e.probation and e.probation.requests]
    probation = f"probation {sum(counts)} requests" if counts else "probation -"
    return (
        f"{ring}: {active}/{targeted} active, {probation}, {result.passed}/{result.required} passed"
    )


def failure_lines(
    ring: str, result: GateResult, reports: Mapping[str, Mapping[str, Any] | None]
) -> list[str]:
    """One line per failed device, with the message the device reported (pure)."""
    lines = []
    for verdict in result.failed:
        entry = read_entry(reports.get(verdict.device_id), ModelEntry)
        message = entry.message if entry is not None and entry.message else ""
        said = f"; the device says: {message}" if message else ""
        lines.append(f"{ring}: {verdict.device_id} failed: {verdict.reason}{said}")
    return lines


class ThrottledReport:
    """Passes a line on when it differs from the last one passed and ``interval`` seconds
    went by since: a gate polled every 100 ms does not flood the terminal."""

    def __init__(
        self,
        report: Callable[[str], None],
        clock: Callable[[], float],
        interval: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self._report = report
        self._clock = clock
        self._interval = interval
        self._last: tuple[str, float] | None = None

    def show(self, line: str, *, final: bool = False) -> None:
        """``final``: the gate's verdict line, shown at once unless it was the last shown."""
        now = self._clock()
        if self._last is not None and (
            line == self._last[0] or (not final and now - self._last[1] < self._interval)
        ):
            return
        self._report(line)
        self._last = (line, now)

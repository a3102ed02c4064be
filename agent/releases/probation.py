"""Probation after a swap: the new model is watched against the one it replaced, ends the
crash guard's trial once it has served its first requests, and a regression rolls it back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from agent.releases.context import ReleaseContext
from agent.releases.lifecycle import (
    ModelState,
    ProbationPolicy,
    ProbationReport,
    ProbationState,
    ServingStats,
    SwapError,
    Verdict,
    judge_probation,
    probation_report,
)
from agent.releases.state import ModelRef
from agent.releases.store import StoreError
from agent.serving.engine import LoadedModel
from agent.ticks import ticks
from wire.reasons import Reason

log = structlog.get_logger(__name__)
RollBack = Callable[[str, Reason], Awaitable[object]]


def serving_stats(model: LoadedModel) -> ServingStats:
    latency = model.latency
    return ServingStats(model.served, model.failed, latency.total, tuple(latency.counts))


class Probations:
    """One probation task per name; `reports` keeps the newest of each, after it ends too."""

    def __init__(
        self,
        ctx: ReleaseContext,
        policy: ProbationPolicy,
        *,
        crash_guard_requests: int,
        crash_guard_s: float,
        roll_back: RollBack,
    ) -> None:
        self._ctx = ctx
        self._policy = policy
        self._guard_requests = crash_guard_requests
        self._guard_s = crash_guard_s
        self._roll_back = roll_back
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # The newest probation of each name, kept after it ends (passed or failed).
        self.reports: dict[str, ProbationReport] = {}

    def start(self, name: str, model: LoadedModel, previous: ServingStats) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(
            self._probation(name, model, previous), name=f"probation-{name}"
        )

    def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel("model changed")
        report = self.reports.get(name)
        if report is not None and report.state is ProbationState.WATCHING:
            # Cut short (a rollback, a newer release): not passed, so not safe either.
            self.reports[name] = dataclasses.replace(report, state=ProbationState.FAILED)

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """Every probation task, forgotten here (the caller cancels and awaits them)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        return tasks

    async def _probation(self, name: str, model: LoadedModel, previous: ServingStats) -> None:
        ref = ModelRef(version=model.version, sha256=model.sha256)
        try:
            await self._watch(name, model, previous, ref)
        finally:
            # Passed, rolled back or cancelled (a newer release, a stop): no longer on trial.
            with contextlib.suppress(StoreError):
                self._ctx.save(lambda state: state.installed(name, ref))

    async def _watch(
        self, name: str, model: LoadedModel, previous: ServingStats, ref: ModelRef
    ) -> None:
        ctx, policy = self._ctx, self._policy
        started = ctx.clock()
        on_trial = True
        until = ctx.wall_clock() + timedelta(seconds=policy.seconds)
        self.reports[name] = probation_report(
            serving_stats(model), previous, Verdict.WATCHING, policy, until
        )
        async for _ in ticks(policy.tick_s, clock=ctx.clock):
            if on_trial and (
                model.served >= self._guard_requests or ctx.clock() - started >= self._guard_s
            ):
                on_trial = False
                ctx.save(lambda state: state.installed(name, ref))
            stats = serving_stats(model)
            verdict = judge_probation(stats, previous, ctx.clock() - started, policy)
            self.reports[name] = probation_report(stats, previous, verdict, policy, until)
            if verdict is Verdict.WATCHING:
                continue
            if verdict in (Verdict.PASSED, Verdict.NO_TRAFFIC):
                self._passed(name, model, stats, verdict)
                return
            reason = (
                Reason.PROBATION_ERRORS if verdict is Verdict.ERRORS else Reason.PROBATION_LATENCY
            )
            log.warning("probation_failed", model=name, version=model.version, reason=reason)
            self._tasks.pop(name, None)  # the rollback must not cancel this very task
            try:
                await self._roll_back(name, reason)
            except SwapError as error:
                # An expected outcome with its reason: no traceback.
                log.error("rollback_failed", model=name, reason=error.reason, error=error.message)  # noqa: TRY400
            return

    def _passed(self, name: str, model: LoadedModel, stats: ServingStats, verdict: Verdict) -> None:
        if verdict is Verdict.PASSED:
            log.info("probation_passed", model=name, version=model.version, served=model.served)
            message = f"probation passed after {stats.served} requests"
        else:
            # Nothing went wrong, but nothing was shown either: it keeps serving, and a ring
            # gate sees `passed_without_traffic`, not `passed`.
            log.warning(
                "probation_passed_without_traffic",
                model=name,
                version=model.version,
                served=stats.served,
                min_requests=self._policy.min_requests,
            )
            message = (
                f"probation ended after {stats.served} requests, fewer than its minimum of "
                f"{self._policy.min_requests}: passed without traffic"
            )
        self._ctx.board.publish(
            name,
            ModelState.ACTIVE,
            None,
            message,
            version=model.version,
            sha256=model.sha256,
        )

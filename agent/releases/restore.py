"""At start: blame a release the process died installing (the crash guard), then serve what
`state.json` says is active, or its last-known-good when the active one no longer loads."""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable

import structlog

from agent.releases.context import ReleaseContext
from agent.releases.lifecycle import ModelState, ModelStatus, SwapError
from wire.reasons import Reason

log = structlog.get_logger(__name__)


class Restore:
    def __init__(
        self, ctx: ReleaseContext, roll_back: Callable[[str, Reason], Awaitable[ModelStatus]]
    ) -> None:
        self._ctx = ctx
        self._roll_back = roll_back

    async def __call__(self) -> None:
        self._recover_crashed_installs()
        await self._restore_all()

    def _recover_crashed_installs(self) -> None:
        ctx = self._ctx
        for name, record in sorted(ctx.store.state.models.items()):
            bad = record.installing
            if bad is None:
                continue
            ctx.save(operator.methodcaller("crash_recovered", name, ctx.wall_clock()))
            after = ctx.store.state.record(name)
            back = after.active
            serving = f"serving version {back.version}" if back is not None else "nothing to serve"
            retry = after.crashed_once is not None
            log.error(
                "crashed_during_install",
                model=name,
                version=bad.version,
                crashes=1 if retry else 2,
                action="retry" if retry else "blocked",
                serving_version=back.version if back is not None else None,
            )
            if retry:
                # One crash is not evidence against the release: it is installed again, under
                # the same guard, when next offered. Nothing is reported failed meanwhile.
                continue
            ctx.metrics.ended(name, ModelState.FAILED, Reason.CRASHED_DURING_INSTALL)
            ctx.board.publish(
                name,
                ModelState.FAILED,
                Reason.CRASHED_DURING_INSTALL,
                f"the agent died twice while installing version {bad.version}; "
                f"it is not installed again; {serving}",
                version=bad.version,
                sha256=bad.sha256,
            )

    async def _restore_all(self) -> None:
        ctx, loader = self._ctx, self._ctx.loader
        for name, record in sorted(ctx.store.state.models.items()):
            if record.active is None:
                continue
            try:
                model = await loader.run(loader.stored_blocking, name, record.active)
            except SwapError as error:
                # An expected outcome with its reason: no traceback.
                log.error("restore_failed", model=name, reason=error.reason, error=error.message)  # noqa: TRY400
                if record.fallback is None:
                    ctx.board.publish(
                        name,
                        ModelState.FAILED,
                        Reason.RESTORE_FAILED,
                        error.message,
                        version=record.active.version,
                        sha256=record.active.sha256,
                    )
                    continue
                await self._roll_back(name, Reason.RESTORE_FAILED)
                continue
            ctx.switch(name, model)
            await loader.attach_stored(name, record.active)
            ctx.board.publish(
                name,
                ModelState.ACTIVE,
                Reason.RESTORED,
                "restored from the model store",
                version=record.active.version,
                sha256=record.active.sha256,
            )

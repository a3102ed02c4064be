"""Rolling back: the last-known-good release of a name serves again, and the release rolled
back from is recorded (refused until a higher version is published)."""

from __future__ import annotations

import structlog

from agent.releases.context import ReleaseContext
from agent.releases.install import Installs
from agent.releases.lifecycle import ModelState, ModelStatus, SwapError
from agent.releases.probation import Probations
from agent.releases.state import NoLastKnownGoodError
from wire.reasons import Reason

log = structlog.get_logger(__name__)


class Rollback:
    def __init__(self, ctx: ReleaseContext, installs: Installs, probations: Probations) -> None:
        self._ctx = ctx
        self._installs = installs
        self._probations = probations

    async def __call__(self, name: str, reason: Reason = Reason.REQUESTED) -> ModelStatus:
        """Serve the last-known-good release of `name` again (`rolled_back`)."""
        ctx, loader = self._ctx, self._ctx.loader
        record = ctx.store.state.record(name)
        target = record.fallback
        if target is None:
            raise SwapError(
                Reason.NO_LAST_KNOWN_GOOD,
                f"model {name!r} has no last-known-good release to roll back to",
            )
        self._installs.cancel(name, "rollback requested")
        self._probations.stop(name)
        # The status describes the release rolled back from; `active_version` the one serving.
        bad = record.active or target
        model = await loader.run(loader.stored_blocking, name, target)
        try:
            ctx.save(lambda state: state.rolled_back(name, reason, ctx.wall_clock()))
        except NoLastKnownGoodError as error:  # raced with another rollback
            raise SwapError(Reason.NO_LAST_KNOWN_GOOD, str(error)) from None
        ctx.switch(name, model)
        await loader.attach_stored(name, target)
        ctx.metrics.ended(name, ModelState.ROLLED_BACK, reason)
        log.warning(
            "model_rolled_back",
            model=name,
            version=bad.version,
            reason=reason,
            serving_version=target.version,
        )
        return ctx.board.publish(
            name,
            ModelState.ROLLED_BACK,
            reason,
            f"version {bad.version} rolled back ({reason}); "
            f"serving last-known-good version {target.version}",
            version=bad.version,
            sha256=bad.sha256,
        )

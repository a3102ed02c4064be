"""Reported properties: one patch in flight at a time, later updates coalesced into the next.

Reported state must be truthful and ordered: two patches racing could land out of order and
leave the twin saying `downloading` after `active`. Updates made while a patch is in flight
(or while the hub is unreachable) merge into one pending patch, sent when the current one
completes; a failed send keeps its content for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.releases.lifecycle import ModelStatus
from module.desired import merge_patch
from wire.reported import (
    DriftEntry,
    ModelEntry,
    ModelHealth,
    ProbationEntry,
    QualityEntry,
    to_twin,
)

log = structlog.get_logger(__name__)

SendPatch = Callable[[dict[str, Any]], Awaitable[None]]


class ReportedProperties:
    """Service-like helper owned by the module: `update()` from anywhere on the loop."""

    def __init__(
        self,
        send: SendPatch,
        *,
        timeout_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._pending: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self.sent = 0
        self.failures = 0

    def update(self, patch: Mapping[str, Any]) -> None:
        """Merge `patch` (JSON merge patch: null removes a key) into what is to be reported."""
        self._pending = _merge_keep_nulls(self._pending, patch)
        self._wake.set()

    def retry_now(self) -> None:
        """Cut a back-off short: the connection is back."""
        self._retry_now.set()
        self._wake.set()

    @property
    def pending(self) -> Mapping[str, Any]:
        return self._pending

    async def run(self) -> None:
        """Send pending patches one at a time until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            patch, self._pending = self._pending, {}
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._send(patch)
            except asyncio.CancelledError:
                # Stopping mid-send: keep the patch for `flush` (sent twice at worst: harmless).
                self._pending = _merge_keep_nulls(patch, self._pending)
                raise
            except Exception as error:  # the hub is down or slow: keep it and try again
                self.failures += 1
                # Newer values win over the ones that failed to go out.
                self._pending = _merge_keep_nulls(patch, self._pending)
                log.warning("reported_patch_failed", error=str(error), keys=sorted(patch))
                self._retry_now.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry_s):
                        await self._retry_now.wait()
                self._wake.set()
            else:
                self.sent += 1

    async def flush(self, timeout_s: float) -> bool:
        """Send what is pending now (shutdown); False if it could not be sent in time."""
        if not self._pending:
            return True
        patch, self._pending = self._pending, {}
        try:
            async with asyncio.timeout(timeout_s):
                await self._send(patch)
        except Exception as error:  # shutting down: nothing left to retry with
            log.warning("final_reported_patch_failed", error=str(error))
            return False
        self.sent += 1
        return True


def _merge_keep_nulls(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Like a merge patch, but a `null` is kept: it must reach the hub to delete the key there."""
    merged = dict(target)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge_keep_nulls(merged[key], value)
        else:
            merged[key] = merge_patch({}, {"v": value})["v"] if value is not None else None
    return merged


def _none(name: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class EntrySections:
    """Where each section of a model's reported entry comes from, by model name (None: the
    section does not apply, and its null removes it from the twin)."""

    probation: Callable[[str], ProbationEntry | None] = _none
    health: Callable[[str], ModelHealth | None] = _none
    drift: Callable[[str], DriftEntry | None] = _none
    quality: Callable[[str], QualityEntry | None] = _none


class ModelEntries:
    """The one place a model's reported entry (`models.<name>`, `wire.reported.ModelEntry`)
    is built: the model's status plus its sections."""

    def __init__(
        self, statuses: Mapping[str, ModelStatus], sections: EntrySections = EntrySections()
    ) -> None:
        self._statuses = statuses
        self._sections = sections

    def entry(self, name: str) -> ModelEntry:
        status = self._statuses.get(name)
        head = status.entry() if status is not None else ModelEntry()
        found = self._sections
        sections = ModelEntry(
            probation=found.probation(name),
            health=found.health(name),
            drift=found.drift(name),
            quality=found.quality(name),
        )
        return head.model_copy(update={k: getattr(sections, k) for k in sections.model_fields_set})

    def patch(self, names: Iterable[str]) -> dict[str, Any]:
        return {"models": {name: to_twin(self.entry(name)) for name in names}}

"""The inference service: validation, dispatch, micro-batching and metrics around one model.

Dispatch is chosen per call from the model's measured cost (see `engine.CostModel`):

* a model whose fixed cost per call (the part a batch shares) is under `coalesce_above_s`
  runs each request at once in the caller's coroutine: deferring it to a loop callback
  (about 10 µs with its future) would cost more than sharing the call saves;
* otherwise requests are queued and flushed by one loop callback, so every request that
  arrives within the same event-loop iteration (or within `max_wait_s`) shares a call;
* a lone request estimated under `inline_budget_s` runs on the event loop; a costlier call
  runs on a worker thread (ONNX Runtime releases the GIL), and requests arriving meanwhile
  form the next batch. A thread hand-off costs 70-150 µs here, hence the inline budget;
* a batch of several requests is evidence of load: there the loop has other requests to
  decode, so any call over `busy_inline_budget_s` goes to the worker thread and the two
  cores work in parallel.

Requests in flight keep the `LoadedModel` they were validated against, so a swap never makes
a queued request meet a different model.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog
from pydantic import Field

from agent.config import Section
from agent.observation.metrics import InferenceMetrics
from agent.serving.batching import batch_key, split, stack, take_batch
from agent.serving.contract import InputValidator, RequestError, RequestLimits
from agent.serving.engine import LoadedModel
from wire.contract import ModelContract
from wire.reasons import Reason

log = structlog.get_logger(__name__)

PLATFORM = "onnxruntime_onnx"


class BatchingPolicy(Section):
    """Dispatch and coalescing (see the module docstring); times in the units users set."""

    enabled: bool = Field(True, alias="batching")
    max_rows: int = Field(32, ge=1, le=4096, alias="max_batch")
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    inline_budget_us: float = Field(1500.0, ge=0.0, le=1_000_000.0)
    busy_inline_budget_us: float = Field(200.0, ge=0.0, le=1_000_000.0)
    coalesce_above_us: float = Field(100.0, ge=0.0, le=1_000_000.0)
    worker_threads: int = Field(1, ge=1, le=64)


class RequestObserver(Protocol):
    """Watches served requests (drift sampling, predictions kept for feedback); called on the
    event loop after each answered request, so it must cost next to nothing."""

    def observe(
        self,
        name: str,
        version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        rows: int,
    ) -> None: ...

    def remember(
        self, request_id: str, name: str, version: int, outputs: Mapping[str, np.ndarray], rows: int
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[int, ...]
    platform: str
    contract: ModelContract
    parameters: Mapping[str, str | int | float | bool]


@dataclass(slots=True)
class _Pending:
    model: LoadedModel
    inputs: Mapping[str, np.ndarray]
    rows: int
    key: Hashable
    outputs: tuple[str, ...]
    arrived: float
    future: asyncio.Future[list[np.ndarray]] = field(repr=False)


class InferenceService:
    """Serves one model name; `activate` switches the model behind it."""

    def __init__(
        self,
        name: str,
        metrics: InferenceMetrics,
        *,
        policy: BatchingPolicy | None = None,
        limits: RequestLimits | None = None,
        observer: RequestObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.policy = policy = policy or BatchingPolicy()
        self.limits = limits or RequestLimits()
        # In seconds, read once: the dispatch decision runs per request.
        self._max_wait_s = policy.max_wait_ms / 1e3
        self._inline_budget_s = policy.inline_budget_us / 1e6
        self._busy_inline_budget_s = policy.busy_inline_budget_us / 1e6
        self._coalesce_above_s = policy.coalesce_above_us / 1e6
        self._metrics = metrics
        self._stats = metrics.model(name)
        self._clock = clock
        self._model: LoadedModel | None = None
        # The lifecycle state of this name (downloading, active, rolled_back...), shown in
        # the v2 model metadata; set by the model manager.
        self.status: Mapping[str, object] = {}
        self.observer = observer  # drift and quality watching; None: not watched
        self._validator: InputValidator | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=self.policy.worker_threads, thread_name_prefix=f"infer-{name}"
        )
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._flush_handle: asyncio.Handle | None = None
        self._flush_is_timer = False
        self._threads_busy = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._drained: dict[int, asyncio.Event] = {}

    # -- model lifecycle -------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Switch to `model`; return the previous one, which may still have calls in flight."""
        previous, self._model = self._model, model
        self._validator = InputValidator(model.contract, self.limits)
        self._metrics.set_model(self.name, model.version, model.sha256)
        self._stats.loaded(model.load_rss_delta_bytes, beside_previous=previous is not None)
        return previous

    async def drained(self, model: LoadedModel) -> None:
        """Wait until no request holds `model` any more (it may then be closed)."""
        while model.in_flight:
            event = self._drained.setdefault(id(model), asyncio.Event())
            await event.wait()

    async def release(self, model: LoadedModel, drain_timeout_s: float) -> None:
        """Close `model` once no request holds it (a replaced or retired model); a request
        still running after the timeout does not keep it open."""
        try:
            async with asyncio.timeout(drain_timeout_s):
                await self.drained(model)
        except TimeoutError:
            log.warning("drain_timed_out", model=self.name, version=model.version)
        model.close()

    async def retire(self, drain_timeout_s: float) -> None:
        """Serve no more (the model is no longer wanted): new requests are refused as not
        ready, those in flight finish on the model, then its threads stop and its series go."""
        model, self._model, self._validator = self._model, None, None
        if model is not None:
            await self.release(model, drain_timeout_s)
        await self.close()
        self._metrics.forget_model(self.name)

    def metadata(self) -> ModelMetadata:
        model = self._model
        lifecycle = {
            f"status_{key}": value
            for key, value in self.status.items()
            if isinstance(value, str | int | float | bool)
        }
        if model is None:
            return ModelMetadata(
                self.name,
                (),
                PLATFORM,
                ModelContract(inputs=(), outputs=()),
                {"ready": False, **lifecycle},
            )
        return ModelMetadata(
            name=self.name,
            versions=(model.version,),
            platform=PLATFORM,
            contract=model.contract,
            parameters={
                "ready": True,
                "sha256": model.sha256,
                "batch1_cost_us": round(model.cost.estimate(1) * 1e6, 1),
                "dispatch": "coalesced" if self._coalesces(model) else "direct",
                **lifecycle,
            },
        )

    def _coalesces(self, model: LoadedModel) -> bool:
        """Whether requests for `model` are queued to share calls (see the module docstring)."""
        policy = self.policy
        return (
            policy.enabled
            and model.contract.batchable
            and model.cost.fixed_s >= self._coalesce_above_s
        )

    async def close(self) -> None:
        """Fail what is still queued and stop the worker threads."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    RequestError(Reason.NOT_READY, "agent is shutting down")
                )
        self._queued_rows = 0
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # -- requests --------------------------------------------------------------------

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request; raises `RequestError` for anything the model cannot take."""
        return (await self.infer_versioned(inputs, outputs))[1]

    async def infer_versioned(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        request_id: str | None = None,
    ) -> tuple[int, dict[str, np.ndarray]]:
        """`infer`, with the version of the model that answered (a swap may happen meanwhile).

        `request_id` (the OIP request id or the route's correlation id) lets feedback label
        this prediction later."""
        clock = self._clock
        arrived = clock()
        metrics = self._metrics
        # One read of both: a swap between them would check against the wrong contract.
        model, validator = self._model, self._validator
        if model is None or validator is None:
            metrics.reject(Reason.NOT_READY)
            raise RequestError(Reason.NOT_READY, f"model {self.name!r} has no active version yet")
        metrics.in_flight.inc()
        model.in_flight += 1
        try:
            try:
                rows = validator(inputs)
                names = model.contract.output_names if not outputs else _checked(model, outputs)
                results = await self._dispatch(model, inputs, rows, names, arrived)
                _refuse_non_finite(names, results)
            except RequestError as error:
                metrics.reject(error.reason)
                raise
            except Exception:
                metrics.failed.inc()
                model.failed += 1
                log.exception("inference_failed", model=self.name, version=model.version)
                raise
            metrics.ok.inc()
            answered = dict(zip(names, results, strict=True))
            if (observer := self.observer) is not None:
                observer.observe(self.name, model.version, inputs, answered, rows)
                if request_id is not None:
                    observer.remember(request_id, self.name, model.version, answered, rows)
            return model.version, answered
        finally:
            model.in_flight -= 1
            if model.in_flight == 0 and (event := self._drained.pop(id(model), None)):
                event.set()
            metrics.in_flight.dec()
            elapsed = clock() - arrived
            metrics.total.observe(elapsed)
            self._stats.total.observe(elapsed)
            model.served += 1
            model.latency.observe(elapsed)

    async def _dispatch(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        names: Sequence[str],
        arrived: float,
    ) -> list[np.ndarray]:
        if not self._coalesces(model):
            self._metrics.queue_wait.observe(self._clock() - arrived)
            if model.cost.estimate(rows) <= self._inline_budget_s:
                return self._run_inline(model, inputs, names, rows)
            return await self._run_in_thread(model, inputs, names, rows)
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.append(
            _Pending(model, inputs, rows, batch_key(inputs), tuple(names), arrived, future)
        )
        self._queued_rows += rows
        self._schedule_flush()
        return await future

    def _run_inline(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        names: Sequence[str] | None,
        rows: int,
    ) -> list[np.ndarray]:
        start = self._clock()
        results = model.run(inputs, names)
        self._record_batch(start, rows, inline=True)
        return results

    async def _run_in_thread(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        names: Sequence[str] | None,
        rows: int,
    ) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        start = self._clock()
        self._threads_busy += 1
        try:
            return await loop.run_in_executor(self._executor, model.run, inputs, names)
        finally:
            self._threads_busy -= 1
            self._record_batch(start, rows, inline=False)

    def _record_batch(self, start: float, rows: int, *, inline: bool) -> None:
        metrics, stats = self._metrics, self._stats
        seconds = self._clock() - start
        metrics.compute.observe(seconds)
        metrics.batch_rows.observe(rows)
        stats.compute_s += seconds
        stats.batch_rows.observe(rows)
        (metrics.dispatch_inline if inline else metrics.dispatch_thread).inc()

    # -- coalescing ------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._threads_busy >= self.policy.worker_threads:
            return  # the batch finishing on a thread flushes what queued meanwhile
        wait = self._max_wait_s > 0 and self._queued_rows < self.policy.max_rows
        if self._flush_handle is not None:
            if wait or not self._flush_is_timer:
                return  # the flush already due is soon enough
            self._flush_handle.cancel()  # a full batch need not wait out the timer
        loop = asyncio.get_running_loop()
        if wait:
            self._flush_handle = loop.call_later(self._max_wait_s, self._flush)
        else:
            self._flush_handle = loop.call_soon(self._flush)
        self._flush_is_timer = wait

    def _flush(self) -> None:
        """Run the next batch; one per callback so the loop never stalls past one budget."""
        self._flush_handle = None
        batch = self._next_batch()
        if not batch:
            return
        model = batch[0].model
        rows = [p.rows for p in batch]
        now = self._clock()
        for pending in batch:
            self._metrics.queue_wait.observe(now - pending.arrived)
        budget = self._inline_budget_s if len(batch) == 1 else self._busy_inline_budget_s
        if model.cost.estimate(sum(rows)) <= budget:
            try:
                if len(batch) == 1:  # nothing to stack or split: the request's own call
                    lone = batch[0]
                    result = self._run_inline(model, lone.inputs, lone.outputs, lone.rows)
                    if not lone.future.done():
                        lone.future.set_result(result)
                else:
                    stacked = stack([p.inputs for p in batch])
                    _resolve(batch, model, self._run_inline(model, stacked, None, sum(rows)), rows)
            except Exception as error:  # one failed call fails its own batch, not the service
                _fail(batch, error)
            if self._queue:
                self._schedule_flush()
        else:
            task = asyncio.get_running_loop().create_task(self._flush_in_thread(batch, model, rows))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _flush_in_thread(
        self, batch: list[_Pending], model: LoadedModel, rows: list[int]
    ) -> None:
        try:
            outputs = await self._run_in_thread(
                model, stack([p.inputs for p in batch]), None, sum(rows)
            )
            _resolve(batch, model, outputs, rows)
        except Exception as error:  # one failed call fails its own batch, not the service
            _fail(batch, error)
        if self._queue:
            self._schedule_flush()

    def _next_batch(self) -> list[_Pending]:
        queue = self._queue
        if not queue:
            return []
        head_model = queue[0].model
        candidates = [(p.key, p.rows) for p in queue if p.model is head_model]
        chosen = set(take_batch(candidates, self.policy.max_rows))
        batch: list[_Pending] = []
        kept: deque[_Pending] = deque()
        index = 0
        for pending in queue:
            if pending.model is head_model:
                (batch if index in chosen else kept).append(pending)
                index += 1
            else:
                kept.append(pending)
        self._queue = kept
        self._queued_rows -= sum(p.rows for p in batch)
        return [p for p in batch if not p.future.cancelled()]


def _checked(model: LoadedModel, requested: Sequence[str]) -> Sequence[str]:
    available = model.contract.output_names
    for name in requested:
        if name not in available:
            raise RequestError(
                Reason.UNKNOWN_OUTPUT, f"unknown output {name!r}; model has {list(available)}"
            )
    return requested


def _resolve(
    batch: Sequence[_Pending], model: LoadedModel, outputs: list[np.ndarray], rows: list[int]
) -> None:
    index = {name: i for i, name in enumerate(model.contract.output_names)}
    for pending, parts in zip(batch, split(outputs, rows), strict=True):
        if not pending.future.done():
            pending.future.set_result([parts[index[name]] for name in pending.outputs])


def _fail(batch: Sequence[_Pending], error: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


def _refuse_non_finite(names: Sequence[str], results: Sequence[np.ndarray]) -> None:
    """Refuse an answer holding NaN or Inf, in any encoding.

    JSON has no literal for them (the v2 protocol's JSON tensors are standard JSON, and the
    agent's own parser refuses `NaN`), so an answer with them would be invalid JSON, or a
    `null` a client reads as something else; and drift and feedback would score the garbage.
    Binary outputs could carry them, but the route has only JSON, and one outcome per input
    beats one per transport. The refusal is 422, a rejection and not a model failure: the
    same input gets the same answer (retrying is useless), and a client sending extreme
    inputs must not be able to roll back a good release through probation's error rate.
    """
    for name, array in zip(names, results, strict=True):
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise RequestError(
                Reason.NON_FINITE_OUTPUT,
                f"{Reason.NON_FINITE_OUTPUT}: output {name!r} holds NaN or Inf for this input "
                "(an overflow in the model?), which JSON cannot carry",
            )

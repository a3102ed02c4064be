"""One message, call or window that fails is counted and logged, and its loop goes on; only
cancellation ends it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import psutil
import pytest
from azure.iot.device import Message
from prometheus_client import CollectorRegistry

from agent.observation.limits import read_limits
from agent.observation.metrics import InferenceMetrics, LoopFailures
from agent.observation.resources import Resources, read_resources
from module.connection import HubConnection
from module.methods import DirectMethods
from module.routes import FEEDBACK_INPUT, InferRoute, RouteMetrics
from module.telemetry import Telemetry
from tests.support.polling import poll_async


def _connection(registry: CollectorRegistry) -> HubConnection:
    def no_client() -> Any:
        raise AssertionError("no hub in these tests")

    return HubConnection(
        no_client,
        registry,
        call_timeout_s=1.0,
        offline_budget_s=60.0,
        max_queued_messages=8,
        on_dropped=lambda: None,
    )


class FlakyFeedback:
    """Fails on the messages whose body says so; records the others."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.handled: list[bytes] = []
        self._error = error or RuntimeError("a bug of ours")

    def handle(self, message: Message) -> None:
        if message.data == b"fail":
            raise self._error
        self.handled.append(message.data)


def _feedback(body: bytes) -> Message:
    message = Message(body)  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
    message.input_name = FEEDBACK_INPUT
    return message


def _route(feedback: FlakyFeedback, failures: LoopFailures) -> InferRoute:
    registry = CollectorRegistry()
    return InferRoute(
        _connection(registry),
        {},
        InferenceMetrics(registry),
        RouteMetrics(registry),
        default_model=lambda: None,
        max_in_flight=1,
        max_input_bytes=1024,
        feedback=feedback,
        failures=failures,
    )


async def test_a_message_whose_handler_fails_is_counted_and_the_route_goes_on() -> None:
    feedback, failures = FlakyFeedback(), LoopFailures()
    route = _route(feedback, failures)
    task = asyncio.get_running_loop().create_task(route.run())
    for body in (b"fail", b"one", b"fail", b"two"):
        route._connection.messages.put_nowait(_feedback(body))
    await poll_async(lambda: feedback.handled == [b"one", b"two"] or None, 5, "both handled")
    assert failures.counts["route"] == 2
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
async def test_interrupts_and_exits_still_end_the_route(error: BaseException) -> None:
    failures = LoopFailures()
    route = _route(FlakyFeedback(error), failures)
    route._connection.messages.put_nowait(_feedback(b"fail"))
    # Awaited in this task, not another: the event loop itself re-raises these from a task.
    with pytest.raises(type(error)):
        async with asyncio.timeout(5):
            await route.run()
    assert failures.counts["route"] == 0


class BrokenManager:
    async def rollback(self, name: str) -> object:
        raise RuntimeError("a bug of ours")


def _methods(failures: LoopFailures, status: Callable[[], Any]) -> DirectMethods:
    registry = CollectorRegistry()
    return DirectMethods(
        _connection(registry),
        BrokenManager(),  # type: ignore[arg-type]  # a fake of the one method called
        InferenceMetrics(registry),
        registry,
        status=status,
        default_model=lambda: "m",
        failures=failures,
    )


async def test_a_method_that_fails_is_answered_500_and_counted() -> None:
    failures = LoopFailures()
    methods = _methods(failures, status=lambda: {"ok": True})
    status, body = await methods.result("rollback", {"model": "m"})
    assert status == 500
    assert "rollback method failed" in body["error"]
    assert failures.counts["method"] == 1
    assert await methods.result("status", None) == (200, {"ok": True})  # and it goes on


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [({"model": [[[[[["m"]]]]]]}, "too_deep"), ({"model": "m" * 200_000}, "too_large")],
)
async def test_a_method_payload_past_the_limits_is_refused_before_pydantic(
    payload: object, fragment: str
) -> None:
    failures = LoopFailures()
    status, body = await _methods(failures, status=dict).result("rollback", payload)
    assert status == 400
    assert fragment in body["error"]
    assert failures.counts["method"] == 0


def test_an_unknown_loop_name_is_a_bug_not_a_new_label() -> None:
    with pytest.raises(ValueError, match="unknown loop"):
        LoopFailures().record("anything")


class RecordingOutbox:
    def __init__(self) -> None:
        self.sent: list[Mapping[str, object]] = []

    def put(self, output: str, payload: Mapping[str, object], schema: str) -> bool:
        self.sent.append(payload)
        return True


class NoModels:
    def __init__(self) -> None:
        self.statuses: dict[str, object] = {}


async def test_a_telemetry_window_that_fails_is_counted_and_the_next_one_goes_out() -> None:
    reads = 0

    def resources() -> Resources:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise RuntimeError("/proc is not what it was")
        return read_resources(psutil.Process(), read_limits())

    failures, outbox = LoopFailures(), RecordingOutbox()
    telemetry = Telemetry(
        {},
        NoModels(),  # type: ignore[arg-type]  # the statuses are all it reads
        InferenceMetrics(CollectorRegistry()),
        outbox,  # type: ignore[arg-type]  # `put` is all it calls
        on_health=lambda health: None,
        resources=resources,
        on_profile=lambda profile: None,
        failures=failures,
    )
    task = asyncio.get_running_loop().create_task(telemetry._emit(0.05))
    await poll_async(lambda: outbox.sent or None, 5, "a window after the failed one")
    assert failures.counts["telemetry"] == 1
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

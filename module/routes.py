"""The `infer` input: v2 requests as route messages, answered on `predictions` by correlation id.

A message is answered through the agent's one v2 path (`agent.serving.v2.infer_v2`), with JSON
outputs only (routes have no binary-data header). Which model: the message's `model`
property, else the default the module chose (see `EdgeModule.default_model`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog
from azure.iot.device import Message
from prometheus_client import CollectorRegistry, Counter

from agent.observation.metrics import InferenceMetrics, LoopFailures
from agent.serving.contract import RequestError
from agent.serving.v2 import InferenceError, ServedModel, infer_v2
from module.connection import HubConnection
from wire.reasons import Reason

log = structlog.get_logger(__name__)

INFER_INPUT = "infer"
FEEDBACK_INPUT = "feedback"
PREDICTIONS = "predictions"
MAX_ROUTE_MESSAGE_BYTES = 255 * 1024  # IoT Hub's 256 KB, less room for the properties


def _input_label(message: Message) -> str:
    """The input a message came on, as a bounded log field (the name is the sender's)."""
    name = message.input_name
    return name if name in (INFER_INPUT, FEEDBACK_INPUT) else "other"


class FeedbackHandler(Protocol):
    def handle(self, message: Message) -> None: ...


class RouteMetrics:
    """`<namespace>_route_messages_total`, by outcome."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "agent") -> None:
        self.messages = Counter(
            "route_messages",
            "Messages on the infer and feedback inputs, by outcome.",
            ["outcome"],
            namespace=namespace,
            registry=registry,
        )


def json_message(body: bytes, message_id: str, schema: str) -> Message:
    message: Message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        body, message_id=message_id, content_encoding="utf-8", content_type="application/json"
    )
    message.custom_properties["schema"] = schema
    return message


class InferRoute:
    """Takes route messages off the connection's queue, at most `max_in_flight` at once."""

    def __init__(
        self,
        connection: HubConnection,
        models: Mapping[str, ServedModel],
        metrics: InferenceMetrics,
        route_metrics: RouteMetrics,
        *,
        default_model: Callable[[], str | None],
        max_in_flight: int,
        max_input_bytes: int,
        feedback: FeedbackHandler | None = None,
        failures: LoopFailures | None = None,
    ) -> None:
        self._failures = failures or LoopFailures()
        self._connection = connection
        self._models = models
        self._metrics = metrics
        self._counts = route_metrics.messages
        self._default_model = default_model
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_input_bytes = max_input_bytes
        self._feedback = feedback
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        # Unique per message without a uuid4 each: os.urandom releases the GIL, and on the
        # route's hot path the SDK's threads then hold the loop up. (The prefix is drawn once:
        # inside the generator expression it was drawn for every message.)
        prefix = uuid.uuid4().hex
        self._ids = (f"{prefix}-{n}" for n in itertools.count())

    async def run(self) -> None:
        messages = self._connection.messages
        while True:
            message = await messages.get()
            try:
                await self._take(message)
            except Exception:  # one message must never end the route: counted, logged, next
                self._failures.record("route", input=_input_label(message))

    async def _take(self, message: Message) -> None:
        if not self.accepting:
            self._counts.labels("dropped_stopping").inc()
            return
        if message.input_name == FEEDBACK_INPUT and self._feedback is not None:
            self._feedback.handle(message)  # synchronous and cheap: no slot needed
            return
        if message.input_name != INFER_INPUT:
            self._counts.labels("unknown_input").inc()
            log.warning("unknown_input", input=str(message.input_name)[:64])
            return
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._answer(message))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._slots.release()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking messages; wait for those in flight."""
        self.accepting = False
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=max(timeout_s, 0.1))

    async def _answer(self, message: Message) -> None:
        correlation = message.correlation_id or message.message_id
        try:
            payload = await self.predict(message)
            schema, outcome = "oip-v2-response/1", "ok"
        except RequestError as error:
            payload = json.dumps({"error": error.message}).encode()
            schema, outcome = "oip-v2-error/1", "error"
        except InferenceError as error:  # logged by `infer_v2`
            payload = json.dumps({"error": error.message}).encode()
            schema, outcome = "oip-v2-error/1", "failed"
        except Exception:  # a failure of ours: answered, logged, never a crash
            log.exception("route_inference_failed")
            payload = json.dumps({"error": "inference failed; see the agent log"}).encode()
            schema, outcome = "oip-v2-error/1", "failed"
        self._counts.labels(outcome).inc()
        await self._send(payload, schema, correlation)

    async def predict(self, message: Message) -> bytes:
        """The v2 response to one route message, or `RequestError` saying what was wrong."""
        body = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        named = message.custom_properties.get("model")
        name = named if isinstance(named, str) and named else self._default_model()
        if name is None:
            self._metrics.reject(Reason.UNKNOWN_MODEL)
            raise RequestError(
                Reason.UNKNOWN_MODEL,
                "several models are served here: name one in the message's `model` property",
            )
        payload = (
            await infer_v2(
                self._models,
                name,
                body,
                metrics=self._metrics,
                max_input_bytes=self._max_input_bytes,
                json_only=True,
                correlation_id=message.correlation_id or message.message_id,
            )
        ).body
        if len(payload) > MAX_ROUTE_MESSAGE_BYTES:
            raise RequestError(
                Reason.TOO_LARGE,
                f"the response is {len(payload)} bytes, over a route message's 256 KB; "
                "ask for fewer rows or use HTTP",
            )
        return payload

    async def _send(self, payload: bytes, schema: str, correlation: str | None) -> None:
        client = self._connection.client
        if client is None:
            self._counts.labels("reply_failed").inc()
            return
        message = json_message(payload, next(self._ids), schema)
        message.correlation_id = correlation
        try:
            await self._connection.call(client.send_message_to_output(message, PREDICTIONS))
        except Exception as error:  # the requester times out and retries on its side
            self._counts.labels("reply_failed").inc()
            log.warning("prediction_send_failed", error=str(error), correlation_id=correlation)

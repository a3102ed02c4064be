"""The `feedback` input route: ground-truth labels for earlier predictions.

A message body is one item or a list of items, each ``{"id": <correlation id of the
prediction>, "label": <number | bool, or a list of them, one per row of that request>}``.
Parsing is strict and bounded; what the labels are joined with is the agent's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Protocol

import structlog
from azure.iot.device import Message
from pydantic import Field, StringConstraints, TypeAdapter, ValidationError

from module.routes import MAX_ROUTE_MESSAGE_BYTES, RouteMetrics
from wire.base import WireModel
from wire.bounded_json import BoundedJsonError, JsonLimits, check_bounds

log = structlog.get_logger(__name__)

MAX_ITEMS = 1000
# A list of items holding a label or a list of labels: three levels; a little room for errors
# to be named by pydantic rather than by depth.
LIMITS = JsonLimits(max_bytes=MAX_ROUTE_MESSAGE_BYTES, max_depth=8)

Scalar = int | float | bool


class FeedbackItem(WireModel):
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    label: Scalar | Annotated[list[Scalar], Field(min_length=1, max_length=4096)]

    @property
    def labels(self) -> list[Scalar]:
        return self.label if isinstance(self.label, list) else [self.label]


_ONE: TypeAdapter[FeedbackItem] = TypeAdapter(FeedbackItem)
_MANY: TypeAdapter[list[FeedbackItem]] = TypeAdapter(
    Annotated[list[FeedbackItem], Field(min_length=1, max_length=MAX_ITEMS)]
)


def parse_feedback(body: bytes) -> list[FeedbackItem]:
    """The items of one feedback message; `ValueError` names what is wrong."""
    try:
        body = check_bounds(body, LIMITS)
    except BoundedJsonError as error:
        raise ValueError(f"feedback refused: {error.problem}: {error.message}") from None
    try:
        # The first significant byte says one item or a list: no second parse for it.
        if body.lstrip()[:1] == b"[":
            return _MANY.validate_json(body)
        return [_ONE.validate_json(body)]
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        if first["type"] == "json_invalid":
            raise ValueError(f"feedback is not JSON: {first['msg']}") from None
        raise ValueError(f"feedback {where}: {first['msg']}") from None


class LabelSink(Protocol):
    """Joins labels with remembered predictions (`agent.observation.watch.Observer`)."""

    keeps_predictions: bool

    def feedback(self, request_id: str, labels: Sequence[Scalar]) -> object: ...


class FeedbackRoute:
    """Messages on the `feedback` input: parsed, handed to the observer, counted."""

    def __init__(self, sink: LabelSink, metrics: RouteMetrics) -> None:
        if not sink.keeps_predictions:
            # Labels would find nothing to join with: every one would count as unknown.
            raise ValueError("a feedback route needs an observer that keeps predictions")
        self._sink = sink
        self._counts = metrics.messages

    def handle(self, message: Message) -> None:
        body = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        try:
            items = parse_feedback(body)
        except ValueError as error:
            self._counts.labels("bad_feedback").inc()
            log.warning("feedback_rejected", error=str(error))
            return
        for item in items:
            self._sink.feedback(item.id, item.labels)
        self._counts.labels("feedback").inc()

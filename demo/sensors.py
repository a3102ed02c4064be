"""The demo's plant sensors: one `sensor` module per device, through the real device SDK.

Each sends a reading a tick as a v2 inference request on output `readings` (routed to the
agent's `infer` input) and, a few readings later, the reading's true class on output `feedback`
(routed to the agent's `feedback` input), as a maintenance log would confirm it. What it sent is
kept, labelled, so the demo can land it in the data folder the retraining controller watches.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient

from deployment.examples import sensor_data
from deployment.retrain.pipeline import INPUT_NAME

FEEDBACK_DELAY = 5  # readings between a reading and its label
# The deployment routes sensor output carrying this schema property to the agent's `feedback`
# input, and everything else from the sensor to `infer`.
FEEDBACK_SCHEMA = "agent-feedback/1"


@dataclass
class Sent:
    """What one sensor sent: correlation id -> send time, and the labelled readings."""

    times: dict[str, float] = field(default_factory=dict)
    readings: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class Sensor:
    def __init__(self, device: str, client: IoTHubModuleClient, *, seed: int) -> None:
        self.device = device
        self.sent = Sent()
        self.fault: sensor_data.SensorFault | None = None
        self._client = client
        self._seed = seed
        self._pending: deque[tuple[str, int]] = deque()

    async def run(self, stop: asyncio.Event, period_s: float) -> None:
        """A reading every `period_s` until `stop`; each tick draws with the current fault."""
        tick = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            x, y = sensor_data.generate(1, seed=self._seed * 1_000_003 + tick, fault=self.fault)
            correlation = uuid.uuid4().hex
            request = {
                "id": f"{self.device}-{tick}",
                "inputs": [
                    {
                        "name": INPUT_NAME,
                        "datatype": "FP32",
                        "shape": [1, len(sensor_data.FEATURES)],
                        "data": [round(float(v), 4) for v in x[0]],
                    }
                ],
            }
            self.sent.times[correlation] = loop.time()
            self.sent.readings.append(x[0])
            self.sent.labels.append(int(y[0]))
            await self._send("readings", request, correlation)
            self._pending.append((correlation, int(y[0])))
            if len(self._pending) > FEEDBACK_DELAY:
                answered, label = self._pending.popleft()
                await self._send(
                    "feedback", {"id": answered, "label": label}, None, FEEDBACK_SCHEMA
                )
            tick += 1
            await asyncio.sleep(period_s)

    async def _send(
        self, output: str, body: object, correlation: str | None, schema: str | None = None
    ) -> None:
        message: Message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
            json.dumps(body),
            message_id=uuid.uuid4().hex,
            content_encoding="utf-8",
            content_type="application/json",
        )
        if correlation is not None:
            message.correlation_id = correlation
        if schema is not None:
            message.custom_properties["schema"] = schema
        await self._client.send_message_to_output(message, output)

    @property
    def count(self) -> int:
        return len(self.sent.labels)

    def labelled(self, since: int) -> tuple[np.ndarray, np.ndarray]:
        """The readings sent from index `since` on, with their true classes."""
        readings = np.array(self.sent.readings[since:], dtype=np.float32)
        # (0, features) when nothing was sent yet, so it concatenates with other sensors' rows.
        return readings.reshape(-1, len(sensor_data.FEATURES)), np.array(
            self.sent.labels[since:], dtype=np.int64
        )

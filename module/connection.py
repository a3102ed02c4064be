"""The hub client: its SDK threads handed over to the loop, the first connect, the offline budget.

azure-iot-device runs our handlers on its own threads; each handler only hands its item to
the event loop (`call_soon_threadsafe`), and everything else happens on the loop. Every SDK
call has a timeout. A hub that stays unreachable past `offline_budget_s` ends `watch()` with
`HubUnreachable`, which the app's TaskGroup turns into a non-zero exit, so the IoT Edge runtime
restarts the module (the SDK is known to wedge after some outages).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import structlog
from azure.iot.device import Message, MethodRequest
from azure.iot.device.aio import IoTHubModuleClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.ticks import ticks

log = structlog.get_logger(__name__)
T = TypeVar("T")

ClientFactory = Callable[[], IoTHubModuleClient]
Event = tuple[Literal["patch", "connection", "method", "resync"], Any]
CONNECT_RETRY_S = (1.0, 30.0)  # first and longest delay between first-connect attempts


class HubUnreachable(Exception):  # noqa: N818 -- an outcome, raised to end the process
    """The hub stayed unreachable past the offline budget."""


class HubConnection:
    """The client, the queues its SDK threads feed, and whether the hub is there."""

    def __init__(
        self,
        client_factory: ClientFactory,
        registry: CollectorRegistry,
        *,
        call_timeout_s: float,
        offline_budget_s: float,
        max_queued_messages: int,
        on_dropped: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = client_factory
        self._call_timeout_s = call_timeout_s
        self._offline_budget_s = offline_budget_s
        self._clock = clock
        self.client: IoTHubModuleClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.messages: asyncio.Queue[Message] = asyncio.Queue(max_queued_messages)
        self.connected = False
        self._offline_since: float | None = clock()
        self._changes = Counter(
            "agent_hub_connection_changes",
            "Connection state changes of the hub client.",
            ["state"],
            registry=registry,
        )
        self._up = Gauge(
            "agent_hub_connected", "1 while the hub client is connected.", registry=registry
        )
        self._timeouts = Counter(
            "agent_hub_call_timeouts", "SDK calls that timed out.", registry=registry
        )
        self._on_dropped = on_dropped

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.client = await asyncio.to_thread(self._factory)
        # The SDK's handler setters block until its handler thread runs: not on our loop.
        await asyncio.to_thread(self._install_handlers, self.client)

    def _install_handlers(self, client: IoTHubModuleClient) -> None:
        client.on_twin_desired_properties_patch_received = self._sdk_patch
        client.on_message_received = self._sdk_message
        client.on_method_request_received = self._sdk_method
        client.on_connection_state_change = self._sdk_connection

    # -- SDK threads -> loop ---------------------------------------------------------

    def _hand_over(self, event: Event) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _sdk_patch(self, patch: dict[str, Any]) -> None:
        self._hand_over(("patch", patch))

    def _sdk_method(self, request: MethodRequest) -> None:
        self._hand_over(("method", request))

    def _sdk_connection(self, _unused: None = None) -> None:
        client = self.client
        self._hand_over(("connection", bool(client is not None and client.connected)))

    def _sdk_message(self, message: Message) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._enqueue_message, message)

    def _enqueue_message(self, message: Message) -> None:
        try:
            self.messages.put_nowait(message)
        except asyncio.QueueFull:
            self._on_dropped()

    def resync_later(self, delay_s: float) -> asyncio.TimerHandle:
        """A `resync` event after `delay_s` (a failed twin read is retried)."""
        assert self._loop is not None
        return self._loop.call_later(delay_s, self.events.put_nowait, ("resync", None))

    # -- connection ------------------------------------------------------------------

    async def connect_until_up(self) -> None:
        """The first connect (the SDK reconnects by itself afterwards); queues `connection`."""
        assert self.client is not None
        delay = CONNECT_RETRY_S[0]
        while True:
            try:
                await self.call(self.client.connect())
            except Exception as error:  # the hub may be down at boot: serve anyway, retry
                log.warning("hub_connect_failed", error=str(error), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_RETRY_S[1])
                continue
            self.events.put_nowait(("connection", True))
            return

    def changed(self, *, connected: bool) -> bool:
        """Record a connection state; False if it is no change."""
        if connected == self.connected:
            return False
        self.connected = connected
        self._up.set(1 if connected else 0)
        self._changes.labels("connected" if connected else "lost").inc()
        log.info("hub_connection", connected=connected)
        self._offline_since = None if connected else self._clock()
        return True

    async def watch(self) -> None:
        """Raise `HubUnreachable` once the hub has been away longer than the offline budget."""
        budget = self._offline_budget_s
        async for _ in ticks(min(5.0, budget / 2)):
            since = self._offline_since
            if since is not None and self._clock() - since > budget:
                raise HubUnreachable(f"hub unreachable for over {budget:.0f} s")

    async def call(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._call_timeout_s):
                return await awaitable
        except TimeoutError:
            self._timeouts.inc()
            raise

    def require(self) -> IoTHubModuleClient:
        """The client while connected, else `ConnectionError` (senders retry later)."""
        client = self.client
        if client is None or not self.connected:
            raise ConnectionError("hub not connected")
        return client

    async def close(self, timeout_s: float) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(max(timeout_s, 0.5)):
                await client.shutdown()
        except (TimeoutError, Exception) as error:  # the process is leaving anyway
            log.warning("hub_shutdown_failed", error=str(error))

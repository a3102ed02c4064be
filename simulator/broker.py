"""The MQTT 3.1.1 over TLS server and its per-client sessions.

A `Session` outlives connections (the device SDK connects with clean_session=False and never
re-subscribes), so it holds the subscriptions, the messages waiting for the client and the QoS 1
messages sent but not yet acknowledged, which are sent again after a reconnect. Every queue is
bounded: a client that stops reading loses the oldest messages (counted in `dropped`), it never
grows the simulator's memory.

What the messages mean is the `BrokerHandler`'s business (IoT Hub semantics live in `hub.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from simulator import mqtt_codec as mqtt

log = structlog.get_logger(__name__)

MQTT_PORT = 8883  # fixed by the device SDK for MQTT over TCP
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_PACKET_BYTES = 256 * 1024 + 16 * 1024  # a full-size message plus a generous topic
MAX_QUEUED_MESSAGES = 20_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
MAX_INFLIGHT = 64
CLOSE_TIMEOUT_SECONDS = 2.0


class ClientError(Exception):
    """The client broke a rule; its connection is closed and `reason` logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ClientIdentity:
    device_id: str
    module_id: str

    @property
    def client_id(self) -> str:
        return f"{self.device_id}/{self.module_id}"


class BrokerHandler(Protocol):
    def authenticate(self, connect: mqtt.Connect) -> ClientIdentity | mqtt.ConnackCode:
        """The identity the CONNECT proves, or the refusal code."""

    async def on_publish(self, session: Session, publish: mqtt.Publish) -> None:
        """Handle a client's publish; raise `ClientError` to close its connection."""

    def on_connection_change(self, session: Session, connected: bool) -> None:
        """The session's client connected or went away."""


@dataclass(frozen=True)
class _Outbound:
    topic: str
    payload: bytes
    expires_at: float | None = None  # on the session's clock; None: never


class PacketSink(Protocol):
    """Where a session writes its packets: a live connection (or a test's list)."""

    @property
    def closing(self) -> bool: ...

    def send(self, packet: mqtt.Packet) -> None: ...


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.wakeup = asyncio.Event()
        self.closing = False

    def send(self, packet: mqtt.Packet) -> None:
        if not self.closing:
            self.writer.write(mqtt.encode(packet))

    def abort(self) -> None:
        """Drop the link at once, without DISCONNECT, as a network failure would."""
        self.closing = True
        self.writer.transport.abort()


class Session:
    """What the broker remembers about one client id between connections."""

    def __init__(
        self,
        identity: ClientIdentity,
        max_queued: int = MAX_QUEUED_MESSAGES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self._clock = clock
        self.subscriptions: dict[str, int] = {}
        self._ready: collections.deque[_Outbound] = collections.deque()
        self._held: collections.deque[_Outbound] = collections.deque()
        self._inflight: dict[int, _Outbound] = {}
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0  # payloads in _ready and _held
        self._next_packet_id = 1
        self.connection: _Connection | None = None
        self.dropped = 0
        self.expired = 0
        self.delivered = 0

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.closing

    def subscription_qos(self, topic: str) -> int | None:
        levels = [qos for flt, qos in self.subscriptions.items() if mqtt.topic_matches(flt, topic)]
        return max(levels) if levels else None

    @property
    def queued(self) -> int:
        return len(self._ready) + len(self._held)

    def _over_budget(self) -> bool:
        return self.queued > 1 and (
            self.queued > self._max_queued or self._queued_bytes > self._max_queued_bytes
        )

    def _enqueue(self, queue: collections.deque[_Outbound], item: _Outbound) -> None:
        queue.append(item)
        self._queued_bytes += len(item.payload)
        # Oldest first, and what nobody subscribed to before what is about to be sent.
        dropped_before = self.dropped
        for victims in (self._held, self._ready):
            while victims and self._over_budget():
                self._queued_bytes -= len(victims.popleft().payload)
                self.dropped += 1
        if self.dropped != dropped_before:
            log.warning("mqtt_queue_full", client_id=self.identity.client_id, dropped=self.dropped)

    def deliver(
        self,
        topic: str,
        payload: bytes,
        *,
        store_and_forward: bool = False,
        ttl_seconds: float | None = None,
    ) -> bool:
        """Queue a publish to the client.

        Without `store_and_forward` (twin responses, patches, method calls) it goes only to a
        connected client subscribed to it, as IoT Hub does. With it (routed module inputs, as
        edgeHub does) it waits for the client to connect and subscribe, for `ttl_seconds` at most.
        """
        expires_at = None if ttl_seconds is None else self._clock() + ttl_seconds
        item = _Outbound(topic, payload, expires_at)
        subscribed = self.subscription_qos(topic) is not None
        if not store_and_forward and not (self.connected and subscribed):
            return False
        self._enqueue(self._ready if subscribed else self._held, item)
        self._wake()
        return True

    def _wake(self) -> None:
        if self.connection is not None:
            self.connection.wakeup.set()

    def subscribe(self, topic_filter: str, qos: int) -> None:
        self.subscriptions[topic_filter] = qos
        still_held: collections.deque[_Outbound] = collections.deque()
        for item in self._held:
            if mqtt.topic_matches(topic_filter, item.topic):
                self._ready.append(item)
            else:
                still_held.append(item)
        self._held = still_held
        self._wake()

    def unsubscribe(self, topic_filter: str) -> None:
        self.subscriptions.pop(topic_filter, None)

    def acknowledge(self, packet_id: int) -> None:
        if self._inflight.pop(packet_id, None) is not None:
            self.delivered += 1
            self._wake()

    def reset(self) -> None:
        """clean_session=True: forget everything."""
        self.subscriptions.clear()
        self._ready.clear()
        self._held.clear()
        self._inflight.clear()
        self._queued_bytes = 0

    def _allocate_packet_id(self) -> int:
        while True:
            packet_id = self._next_packet_id
            self._next_packet_id = packet_id % 65535 + 1
            if packet_id not in self._inflight:
                return packet_id

    def resend_inflight(self, connection: PacketSink) -> None:
        for packet_id, item in self._inflight.items():
            connection.send(mqtt.Publish(item.topic, item.payload, 1, packet_id, dup=True))

    def send_ready(self, connection: PacketSink) -> None:
        """Write what may be sent now: as much as the in-flight window allows."""
        while self._ready and len(self._inflight) < MAX_INFLIGHT and not connection.closing:
            item = self._ready.popleft()
            self._queued_bytes -= len(item.payload)
            if item.expires_at is not None and self._clock() > item.expires_at:
                self.expired += 1
                continue
            qos = self.subscription_qos(item.topic)
            if qos is None:  # unsubscribed since it was queued
                continue
            if qos == 0:
                connection.send(mqtt.Publish(item.topic, item.payload, 0))
                self.delivered += 1
                continue
            packet_id = self._allocate_packet_id()
            self._inflight[packet_id] = item
            connection.send(mqtt.Publish(item.topic, item.payload, 1, packet_id))


async def read_packet(
    reader: asyncio.StreamReader, max_bytes: int, *, connect: bool = False
) -> mqtt.Packet:
    """The next packet; with `connect`, anything but CONNECT is refused from its first byte."""
    first = await reader.readexactly(1)
    if connect and first[0] != mqtt.PacketType.CONNECT << 4:
        raise ClientError("first packet is not CONNECT")
    length_bytes = b""
    while True:
        length_bytes += await reader.readexactly(1)
        decoded = mqtt.decode_remaining_length(length_bytes)
        if decoded is not None:
            length, _ = decoded
            break
    if length > max_bytes:
        raise ClientError(f"packet of {length} bytes exceeds the {max_bytes} byte limit")
    return mqtt.decode_packet(first[0], await reader.readexactly(length))


class Broker:
    """Accepts TLS connections on `host:port` and runs the MQTT session protocol."""

    def __init__(
        self,
        handler: BrokerHandler,
        ssl_context: ssl.SSLContext,
        host: str,
        port: int = MQTT_PORT,
        puback_gate: Callable[[Session], Awaitable[None]] | None = None,
    ) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._host = host
        self._port = port
        self._puback_gate = puback_gate
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sessions: dict[str, Session] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self._host,
            self._port,
            ssl=self._ssl,
            ssl_handshake_timeout=CONNECT_TIMEOUT_SECONDS,
            reuse_address=True,
        )
        log.info("mqtt_listening", host=self._host, port=self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in self.sessions.values():
            if session.connection is not None:
                session.connection.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self._server.wait_closed()

    def session(self, identity: ClientIdentity) -> Session:
        return self.sessions.setdefault(identity.client_id, Session(identity))

    def drop(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        if session is None or session.connection is None:
            return False
        log.info("mqtt_connection_dropped", client_id=client_id, reason="fault injected")
        session.connection.abort()
        return True

    # -------------------------------------------------------- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a stream handler always runs in a task
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        connection = _Connection(reader, writer)
        session: Session | None = None
        reason = "client closed the connection"
        try:
            accepted = await self._accept(connection, peer)
            if accepted is not None:
                session, keep_alive = accepted
                await self._run_session(session, connection, keep_alive)
        except ClientError as exc:
            reason = exc.reason
        except mqtt.MalformedPacketError as exc:
            reason = f"malformed packet: {exc}"
        except TimeoutError:
            reason = "timed out waiting for the client"
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            reason = "connection lost"
        except asyncio.CancelledError:
            reason = "simulator stopping"
        finally:
            connection.closing = True
            if session is not None and session.connection is connection:
                session.connection = None
                self._handler.on_connection_change(session, connected=False)
            client = session.identity.client_id if session else None
            log.info("mqtt_connection_closed", client_id=client, peer=peer, reason=reason)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _accept(self, connection: _Connection, peer: object) -> tuple[Session, int] | None:
        """Read CONNECT and answer it: the session and its keep-alive, or None if refused."""
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            packet = await read_packet(connection.reader, MAX_PACKET_BYTES, connect=True)
        if not isinstance(packet, mqtt.Connect):
            raise ClientError("first packet is not CONNECT")
        if packet.protocol_level != 4:
            connection.send(mqtt.ConnAck(mqtt.ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION))
            raise ClientError("not MQTT 3.1.1")
        verdict = self._handler.authenticate(packet)
        if isinstance(verdict, mqtt.ConnackCode):
            log.warning(
                "mqtt_connect_refused", client_id=packet.client_id, peer=peer, code=verdict.name
            )
            connection.send(mqtt.ConnAck(verdict))
            # Closed gracefully so the CONNACK reaches the client before the link goes.
            connection.writer.close()
            with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError, OSError):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await connection.writer.wait_closed()
            return None
        session = self.sessions.get(verdict.client_id)
        present = session is not None and not packet.clean_session
        session = self.session(verdict)
        if packet.clean_session:
            session.reset()
        if session.connection is not None:
            log.info("mqtt_session_taken_over", client_id=verdict.client_id)
            session.connection.abort()
        session.connection = connection
        connection.send(mqtt.ConnAck(mqtt.ConnackCode.ACCEPTED, session_present=present))
        log.info("mqtt_connected", client_id=verdict.client_id, peer=peer, session_present=present)
        self._handler.on_connection_change(session, connected=True)
        return session, packet.keep_alive

    async def _run_session(
        self, session: Session, connection: _Connection, keep_alive: int
    ) -> None:
        sender = asyncio.create_task(self._send_loop(session, connection))
        try:
            while True:
                # MQTT 3.1.1 §3.1.2.10: silence for 1.5 keep-alive periods means the link is dead.
                timeout = keep_alive * 1.5 if keep_alive else None
                async with asyncio.timeout(timeout):
                    packet = await read_packet(connection.reader, MAX_PACKET_BYTES)
                if isinstance(packet, mqtt.Disconnect):
                    return
                await self._on_packet(session, connection, packet)
                await connection.writer.drain()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender

    async def _on_packet(
        self, session: Session, connection: _Connection, packet: mqtt.Packet
    ) -> None:
        match packet:
            case mqtt.Publish():
                if packet.qos == 2:
                    raise ClientError("QoS 2 publish (IoT Hub does not support QoS 2)")
                await self._handler.on_publish(session, packet)
                if packet.qos == 1 and packet.packet_id is not None:
                    if self._puback_gate is not None:
                        await self._puback_gate(session)
                    connection.send(mqtt.PubAck(packet.packet_id))
            case mqtt.PubAck():
                session.acknowledge(packet.packet_id)
            case mqtt.Subscribe():
                codes = []
                for topic_filter, qos in packet.topics:
                    granted = min(qos, 1)
                    session.subscribe(topic_filter, granted)
                    codes.append(granted)
                connection.send(mqtt.SubAck(packet.packet_id, tuple(codes)))
            case mqtt.Unsubscribe():
                for topic_filter in packet.topics:
                    session.unsubscribe(topic_filter)
                connection.send(mqtt.UnsubAck(packet.packet_id))
            case mqtt.PingReq():
                connection.send(mqtt.PingResp())
            case _:
                raise ClientError(f"unexpected {type(packet).__name__} from a client")

    async def _send_loop(self, session: Session, connection: _Connection) -> None:
        session.resend_inflight(connection)
        while not connection.closing:
            connection.wakeup.clear()
            session.send_ready(connection)
            await connection.writer.drain()
            await connection.wakeup.wait()

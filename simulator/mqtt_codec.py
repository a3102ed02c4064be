"""MQTT 3.1.1 packets as values, and their wire encoding (pure: bytes in, values out).

Only what IoT Hub speaks is supported: QoS 0 and 1 (a QoS 2 request is granted QoS 1, as IoT Hub
does), no retained messages, no will. Anything else is a `MalformedPacketError`, and the broker
closes that one connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAX_REMAINING_LENGTH = 268_435_455  # the largest value four length bytes can carry


class MalformedPacketError(ValueError):
    """The bytes are not a valid MQTT 3.1.1 packet of the kind IoT Hub accepts."""


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(enum.IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80


@dataclass(frozen=True)
class Connect:
    client_id: str
    username: str | None
    password: str | None
    clean_session: bool
    keep_alive: int
    protocol_level: int = 4


@dataclass(frozen=True)
class ConnAck:
    return_code: ConnackCode
    session_present: bool = False


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    packet_id: int | None = None
    dup: bool = False
    retain: bool = False


@dataclass(frozen=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class SubAck:
    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True)
class UnsubAck:
    packet_id: int


@dataclass(frozen=True)
class PingReq:
    pass


@dataclass(frozen=True)
class PingResp:
    pass


@dataclass(frozen=True)
class Disconnect:
    pass


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)


# ---------------------------------------------------------------- remaining length


def encode_remaining_length(length: int) -> bytes:
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {length}")
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def decode_remaining_length(data: bytes) -> tuple[int, int] | None:
    """(length, bytes used) from the start of `data`; None when more bytes are needed."""
    value = 0
    for index in range(4):
        if index >= len(data):
            return None
        byte = data[index]
        value += (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise MalformedPacketError("remaining length longer than four bytes")


# ---------------------------------------------------------------- field readers


class _Reader:
    """Reads MQTT fields from one packet body; every overrun is a malformed packet."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pos = 0

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        (value,) = struct.unpack("!H", self.take(2))
        return int(value)

    def take(self, count: int) -> bytes:
        if self._pos + count > len(self._body):
            raise MalformedPacketError("packet shorter than its fields")
        chunk = self._body[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacketError("string is not UTF-8") from exc
        if "\x00" in value:
            raise MalformedPacketError("string contains U+0000")
        return value

    def rest(self) -> bytes:
        chunk = self._body[self._pos :]
        self._pos = len(self._body)
        return chunk

    @property
    def exhausted(self) -> bool:
        return self._pos == len(self._body)


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


# ---------------------------------------------------------------- decode


def _expect_flags(kind: PacketType, flags: int, expected: int) -> None:
    if flags != expected:
        raise MalformedPacketError(f"{kind.name} with reserved flags {flags:#x}")


def _decode_connect(body: _Reader) -> Connect:
    protocol = body.text()
    level = body.u8()
    if protocol != "MQTT":
        raise MalformedPacketError(f"unknown protocol name {protocol!r}")
    flags = body.u8()
    if flags & 0x01:
        raise MalformedPacketError("CONNECT reserved flag set")
    keep_alive = body.u16()
    client_id = body.text()
    if flags & 0x04:  # a will: IoT Hub ignores it, but its fields must still be skipped
        body.text()
        body.binary()
    username = body.text() if flags & 0x80 else None
    password = body.binary().decode("utf-8", "replace") if flags & 0x40 else None
    return Connect(
        client_id=client_id,
        username=username,
        password=password,
        clean_session=bool(flags & 0x02),
        keep_alive=keep_alive,
        protocol_level=level,
    )


def _decode_publish(flags: int, body: _Reader) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacketError("PUBLISH with QoS 3")
    topic = body.text()
    if not topic or "+" in topic or "#" in topic:
        raise MalformedPacketError("PUBLISH topic empty or with wildcards")
    packet_id = body.u16() if qos else None
    if packet_id == 0:
        raise MalformedPacketError("PUBLISH packet id 0")
    return Publish(
        topic=topic,
        payload=body.rest(),
        qos=qos,
        packet_id=packet_id,
        dup=bool(flags & 0x08),
        retain=bool(flags & 0x01),
    )


def _decode_subscribe(body: _Reader) -> Subscribe:
    packet_id = body.u16()
    topics: list[tuple[str, int]] = []
    while not body.exhausted:
        topic = body.text()
        qos = body.u8()
        if qos > 2 or not topic:
            raise MalformedPacketError("SUBSCRIBE with bad filter or QoS")
        topics.append((topic, qos))
    if not topics:
        raise MalformedPacketError("SUBSCRIBE without topics")
    return Subscribe(packet_id=packet_id, topics=tuple(topics))


def _decode_unsubscribe(body: _Reader) -> Unsubscribe:
    packet_id = body.u16()
    topics: list[str] = []
    while not body.exhausted:
        topics.append(body.text())
    if not topics:
        raise MalformedPacketError("UNSUBSCRIBE without topics")
    return Unsubscribe(packet_id=packet_id, topics=tuple(topics))


def decode_packet(first_byte: int, body: bytes) -> Packet:  # noqa: PLR0912  # one branch per packet type
    """One packet from its first byte and its body (the bytes after the remaining length)."""
    try:
        kind = PacketType(first_byte >> 4)
    except ValueError as exc:
        raise MalformedPacketError(f"unknown packet type {first_byte >> 4}") from exc
    flags = first_byte & 0x0F
    reader = _Reader(body)
    packet: Packet
    match kind:
        case PacketType.CONNECT:
            _expect_flags(kind, flags, 0)
            packet = _decode_connect(reader)
        case PacketType.CONNACK:
            _expect_flags(kind, flags, 0)
            session_present = bool(reader.u8() & 0x01)
            code = reader.u8()
            try:
                packet = ConnAck(ConnackCode(code), session_present)
            except ValueError as exc:
                raise MalformedPacketError(f"unknown CONNACK code {code}") from exc
        case PacketType.PUBLISH:
            return _decode_publish(flags, reader)
        case PacketType.PUBACK:
            _expect_flags(kind, flags, 0)
            packet = PubAck(reader.u16())
        case PacketType.SUBSCRIBE:
            _expect_flags(kind, flags, 2)
            packet = _decode_subscribe(reader)
        case PacketType.SUBACK:
            _expect_flags(kind, flags, 0)
            packet_id = reader.u16()
            packet = SubAck(packet_id, tuple(reader.rest()))
        case PacketType.UNSUBSCRIBE:
            _expect_flags(kind, flags, 2)
            packet = _decode_unsubscribe(reader)
        case PacketType.UNSUBACK:
            _expect_flags(kind, flags, 0)
            packet = UnsubAck(reader.u16())
        case PacketType.PINGREQ:
            _expect_flags(kind, flags, 0)
            packet = PingReq()
        case PacketType.PINGRESP:
            _expect_flags(kind, flags, 0)
            packet = PingResp()
        case PacketType.DISCONNECT:
            _expect_flags(kind, flags, 0)
            packet = Disconnect()
        case _:
            raise MalformedPacketError(f"{kind.name} is not supported (QoS 2 is not)")
    if not reader.exhausted:
        raise MalformedPacketError(f"{kind.name} has trailing bytes")
    return packet


def decode(data: bytes) -> tuple[Packet, int] | None:
    """The first packet in `data` and the bytes it used; None when `data` holds only part of it."""
    if not data:
        return None
    header = decode_remaining_length(data[1:])
    if header is None:
        return None
    length, used = header
    end = 1 + used + length
    if len(data) < end:
        return None
    return decode_packet(data[0], data[1 + used : end]), end


# ---------------------------------------------------------------- encode


def encode(packet: Packet) -> bytes:  # noqa: PLR0911, PLR0912  # one branch per packet type
    match packet:
        case Connect():
            flags = 0x02 if packet.clean_session else 0
            payload = _text(packet.client_id)
            if packet.username is not None:
                flags |= 0x80
                payload += _text(packet.username)
            if packet.password is not None:
                flags |= 0x40
                payload += _text(packet.password)
            header = _text("MQTT") + bytes([packet.protocol_level, flags])
            return _packet(0x10, header + struct.pack("!H", packet.keep_alive) + payload)
        case ConnAck():
            return _packet(0x20, bytes([int(packet.session_present), packet.return_code]))
        case Publish():
            flags = (packet.qos << 1) | (0x08 if packet.dup else 0) | (0x01 if packet.retain else 0)
            body = _text(packet.topic)
            if packet.qos:
                if packet.packet_id is None:
                    raise ValueError("a QoS 1 PUBLISH needs a packet id")
                body += struct.pack("!H", packet.packet_id)
            return _packet(0x30 | flags, body + packet.payload)
        case PubAck():
            return _packet(0x40, struct.pack("!H", packet.packet_id))
        case Subscribe():
            body = struct.pack("!H", packet.packet_id)
            for topic, qos in packet.topics:
                body += _text(topic) + bytes([qos])
            return _packet(0x82, body)
        case SubAck():
            return _packet(0x90, struct.pack("!H", packet.packet_id) + bytes(packet.return_codes))
        case Unsubscribe():
            body = struct.pack("!H", packet.packet_id)
            for topic in packet.topics:
                body += _text(topic)
            return _packet(0xA2, body)
        case UnsubAck():
            return _packet(0xB0, struct.pack("!H", packet.packet_id))
        case PingReq():
            return b"\xc0\x00"
        case PingResp():
            return b"\xd0\x00"
        case Disconnect():
            return b"\xe0\x00"


# ---------------------------------------------------------------- topic filters


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with `+` (one level) and `#` (the rest, including none)."""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)

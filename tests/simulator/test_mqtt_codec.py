"""MQTT 3.1.1 codec: wire bytes against the specification's layouts."""

from __future__ import annotations

import pytest

from simulator import mqtt_codec as mqtt


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_round_trips(length: int, encoded: bytes) -> None:
    assert mqtt.encode_remaining_length(length) == encoded
    assert mqtt.decode_remaining_length(encoded) == (length, len(encoded))


def test_remaining_length_of_five_bytes_is_malformed() -> None:
    with pytest.raises(mqtt.MalformedPacketError):
        mqtt.decode_remaining_length(b"\xff\xff\xff\xff\x01")


def test_partial_remaining_length_needs_more_bytes() -> None:
    assert mqtt.decode_remaining_length(b"\x80") is None


@pytest.mark.parametrize(
    ("packet", "wire"),
    [
        (mqtt.ConnAck(mqtt.ConnackCode.ACCEPTED, session_present=True), b"\x20\x02\x01\x00"),
        (mqtt.ConnAck(mqtt.ConnackCode.NOT_AUTHORIZED), b"\x20\x02\x00\x05"),
        (mqtt.PubAck(0x1234), b"\x40\x02\x12\x34"),
        (mqtt.Publish("a/b", b"hi", qos=0), b"\x30\x07\x00\x03a/bhi"),
        (mqtt.Publish("a/b", b"hi", qos=1, packet_id=7), b"\x32\x09\x00\x03a/b\x00\x07hi"),
        (
            mqtt.Publish("t", b"", qos=1, packet_id=1, dup=True),
            b"\x3a\x05\x00\x01t\x00\x01",
        ),
        (mqtt.Subscribe(10, (("a/#", 1),)), b"\x82\x08\x00\x0a\x00\x03a/#\x01"),
        (mqtt.SubAck(10, (1, 0x80)), b"\x90\x04\x00\x0a\x01\x80"),
        (mqtt.Unsubscribe(3, ("x",)), b"\xa2\x05\x00\x03\x00\x01x"),
        (mqtt.UnsubAck(3), b"\xb0\x02\x00\x03"),
        (mqtt.PingReq(), b"\xc0\x00"),
        (mqtt.PingResp(), b"\xd0\x00"),
        (mqtt.Disconnect(), b"\xe0\x00"),
    ],
)
def test_packets_encode_to_the_spec_layout_and_decode_back(
    packet: mqtt.Packet, wire: bytes
) -> None:
    assert mqtt.encode(packet) == wire
    assert mqtt.decode(wire) == (packet, len(wire))


def test_connect_round_trips_with_credentials() -> None:
    connect = mqtt.Connect(
        client_id="dev/mod",
        username="hub/dev/mod/?api-version=2019-10-01",
        password="SharedAccessSignature sr=x&sig=y&se=1",
        clean_session=False,
        keep_alive=60,
    )
    wire = mqtt.encode(connect)
    assert wire[:12] == b"\x10" + bytes([len(wire) - 2]) + b"\x00\x04MQTT\x04\xc0\x00\x3c"
    assert mqtt.decode(wire) == (connect, len(wire))


def test_connect_with_a_will_skips_the_will_fields() -> None:
    body = b"\x00\x04MQTT\x04\x06\x00\x0a" + b"\x00\x01c" + b"\x00\x01w" + b"\x00\x02hi"
    packet = mqtt.decode_packet(0x10, body)
    assert packet == mqtt.Connect("c", None, None, clean_session=True, keep_alive=10)


def test_decode_waits_for_a_whole_packet() -> None:
    wire = mqtt.encode(mqtt.Publish("a/b", b"x" * 200, qos=1, packet_id=1))
    assert mqtt.decode(wire[:-1]) is None
    assert mqtt.decode(wire + b"\xc0\x00") == (
        mqtt.Publish("a/b", b"x" * 200, qos=1, packet_id=1),
        len(wire),
    )


@pytest.mark.parametrize(
    ("first_byte", "body", "reason"),
    [
        (0x00, b"", "reserved packet type 0"),
        (0xF0, b"", "reserved packet type 15"),
        (0x10, b"\x00\x04MQIsdp\x03", "MQTT 3.1 protocol name"),
        (0x10, b"\x00\x04MQTT\x04\x01\x00\x0a\x00\x00", "CONNECT reserved flag"),
        (0x10, b"\x00\x04MQTT\x04\x02\x00", "CONNECT cut short"),
        (0x36, b"\x00\x01t\x00\x01", "PUBLISH QoS 3"),
        (0x32, b"\x00\x01t\x00\x00", "PUBLISH packet id 0"),
        (0x30, b"\x00\x03a/#", "PUBLISH topic with wildcard"),
        (0x30, b"\x00\x00", "PUBLISH empty topic"),
        (0x30, b"\x00\x02\xff\xfe", "topic not UTF-8"),
        (0x30, b"\x00\x02a\x00", "topic with U+0000"),
        (0x80, b"\x00\x01\x00\x01a\x01", "SUBSCRIBE without flag 2"),
        (0x82, b"\x00\x01", "SUBSCRIBE without topics"),
        (0x82, b"\x00\x01\x00\x01a\x03", "SUBSCRIBE QoS 3"),
        (0x40, b"\x00\x01\x00", "PUBACK trailing byte"),
        (0x50, b"\x00\x01", "PUBREC (QoS 2)"),
        (0xC1, b"", "PINGREQ with flags"),
    ],
)
def test_malformed_packets_are_refused(first_byte: int, body: bytes, reason: str) -> None:
    with pytest.raises(mqtt.MalformedPacketError):
        mqtt.decode_packet(first_byte, body)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("$iothub/twin/res/#", "$iothub/twin/res/200/?$rid=1", True),
        (
            "$iothub/twin/PATCH/properties/desired/#",
            "$iothub/twin/PATCH/properties/desired/?$version=2",
            True,
        ),
        ("$iothub/methods/POST/#", "$iothub/methods/POST/status/?$rid=a", True),
        ("devices/d/modules/m/inputs/#", "devices/d/modules/m/inputs/in/%24.cdid=d", True),
        ("devices/d/modules/m/inputs/#", "devices/d/modules/other/inputs/in/", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("#", "anything/at/all", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_filters_match_as_mqtt_specifies(
    topic_filter: str, topic: str, expected: bool
) -> None:
    assert mqtt.topic_matches(topic_filter, topic) is expected

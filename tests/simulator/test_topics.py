"""Topics and property bags exactly as azure-iot-device writes and reads them."""

from __future__ import annotations

import pytest

from simulator import topics

EVENTS = "devices/dev/modules/mod/messages/events/"


@pytest.mark.parametrize(
    ("bag", "system", "properties"),
    [
        ("", {}, {}),
        ("%24.on=out", {"outputName": "out"}, {}),
        (
            "%24.on=out&%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8",
            {
                "outputName": "out",
                "messageId": "m1",
                "correlationId": "c1",
                "contentType": "application/json",
                "contentEncoding": "utf-8",
            },
            {},
        ),
        ("a=1&b%20c=d%26e%3Df", {}, {"a": "1", "b c": "d&e=f"}),
        ("plus=a+b", {}, {"plus": "a+b"}),  # '+' is not a space in IoT Hub topics
        ("$.exp=2030-01-01T00%3A00%3A00", {"expiryTimeUtc": "2030-01-01T00:00:00"}, {}),
        ("flag", {}, {"flag": ""}),
    ],
)
def test_property_bags_decode(bag: str, system: dict[str, str], properties: dict[str, str]) -> None:
    assert topics.decode_property_bag(bag) == (system, properties)


def test_property_bags_round_trip() -> None:
    system = {"messageId": "m/1", "contentType": "application/json"}
    properties = {"z": "last", "a b": "x&y=z/%"}
    encoded = topics.encode_property_bag(system, properties)
    assert "/" not in encoded
    assert topics.decode_property_bag(encoded) == (system, properties)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("$iothub/twin/GET/?$rid=1", topics.TwinGet("1")),
        ("$iothub/twin/PATCH/properties/reported/?$rid=a%20b", topics.TwinReportedPatch("a b")),
        ("$iothub/methods/res/200/?$rid=5", topics.MethodResponse("5", 200)),
    ],
)
def test_hub_request_topics_parse(topic: str, expected: topics.ClientTopic) -> None:
    assert topics.parse_client_topic(topic, b"", "dev", "mod") == expected


def test_telemetry_names_its_sender() -> None:
    parsed = topics.parse_client_topic(EVENTS + "%24.on=out&k=v", b"body", "dev", "mod")
    assert parsed == topics.Telemetry(
        topics.Message(
            b"body",
            {"outputName": "out", "connectionDeviceId": "dev", "connectionModuleId": "mod"},
            {"k": "v"},
        )
    )


@pytest.mark.parametrize(
    "topic",
    [
        "devices/other/modules/mod/messages/events/",  # another identity's telemetry
        "devices/dev/modules/mod/messages/devicebound/",
        "$iothub/twin/GET/",  # no $rid
        "$iothub/methods/res/ok/?$rid=1",
        "$iothub/unknown",
        "random/topic",
    ],
)
def test_topics_iot_hub_does_not_serve_are_refused(topic: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.parse_client_topic(topic, b"", "dev", "mod")


def test_hub_topics_are_what_the_sdk_parses() -> None:
    assert topics.twin_response_topic(204, "7", 3) == "$iothub/twin/res/204/?$rid=7&$version=3"
    assert topics.twin_response_topic(200, "7") == "$iothub/twin/res/200/?$rid=7"
    assert topics.desired_patch_topic(4) == "$iothub/twin/PATCH/properties/desired/?$version=4"
    assert topics.method_request_topic("do it", "a") == "$iothub/methods/POST/do%20it/?$rid=a"
    message = topics.Message(b"", {"outputName": "o", "messageId": "m"}, {"k": "v"})
    assert (
        topics.input_topic("dev", "mod", "in", message)
        == "devices/dev/modules/mod/inputs/in/%24.mid=m&k=v"
    )


def test_message_size_counts_body_and_properties() -> None:
    message = topics.Message(b"12345", {"messageId": "ab"}, {"k": "vv"})
    assert message.size == 5 + len("messageId") + 2 + 1 + 2

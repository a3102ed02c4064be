"""Hostile or broken clients are refused with IoT Hub's answer, and everyone else is served."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request

import pytest

from simulator import Simulator, sas
from simulator import mqtt_codec as mqtt
from tests.simulator.conftest import DEVICE, ClientFactory
from tests.support.raw_mqtt import RawClient

EVENTS = f"devices/{DEVICE}/modules/producer/messages/events/"


def test_a_valid_connect_is_accepted(sim: Simulator) -> None:
    with RawClient(sim) as client:
        assert client.connect(DEVICE, "producer") == mqtt.ConnAck(mqtt.ConnackCode.ACCEPTED)


@pytest.mark.parametrize(
    ("module", "password", "username", "code"),
    [
        ("ghost", None, None, mqtt.ConnackCode.NOT_AUTHORIZED),
        (
            "producer",
            "SharedAccessSignature sr=x&sig=y&se=1",
            None,
            mqtt.ConnackCode.NOT_AUTHORIZED,
        ),
        ("producer", "not a token", None, mqtt.ConnackCode.NOT_AUTHORIZED),
        (
            "producer",
            None,
            "otherhub/edge-device/producer/?api-version=1",
            mqtt.ConnackCode.BAD_USERNAME_OR_PASSWORD,
        ),
    ],
)
def test_bad_credentials_are_refused_in_connack(
    sim: Simulator, module: str, password: str | None, username: str | None, code: mqtt.ConnackCode
) -> None:
    if module == "ghost":  # an identity the hub never issued, with a well-formed token
        resource = f"{sim.host}/devices/{DEVICE}/modules/ghost"
        password = sas.generate(resource, sas.new_key(), int(time.time()) + 60)
    with RawClient(sim) as client:
        answer = client.connect(DEVICE, module, password=password, username=username)
        assert answer == mqtt.ConnAck(code)
        assert client.receive() is None


def test_a_token_for_another_module_is_refused(sim: Simulator) -> None:
    token = sim.module_sas_token(DEVICE, "consumer", int(time.time()) + 60)
    with RawClient(sim) as client:
        answer = client.connect(DEVICE, "producer", password=token)
    assert answer == mqtt.ConnAck(mqtt.ConnackCode.NOT_AUTHORIZED)


def test_connect_without_credentials_is_refused(sim: Simulator) -> None:
    with RawClient(sim) as client:
        client.send_packet(mqtt.Connect(f"{DEVICE}/producer", None, None, False, 60))
        assert client.receive() == mqtt.ConnAck(mqtt.ConnackCode.BAD_USERNAME_OR_PASSWORD)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00",  # reserved packet type
        b"\x30\xff\xff\xff\xff\x01",  # remaining length of five bytes
        b"\x36\x05\x00\x01t\x00\x01",  # QoS 3
        b"\x82\x02\x00\x01",  # SUBSCRIBE without topics
        mqtt.encode(mqtt.ConnAck(mqtt.ConnackCode.ACCEPTED)),  # a server packet from a client
    ],
)
async def test_malformed_packets_close_only_that_connection(
    sim: Simulator, module_client: ClientFactory, garbage: bytes
) -> None:
    bystander = await module_client("consumer")
    with RawClient(sim) as client:
        client.connect(DEVICE, "producer")
        client.send(garbage)
        assert client.receive() is None
    assert (await bystander.get_twin())["reported"] == {"$version": 1}


def test_garbage_instead_of_connect_is_dropped(sim: Simulator) -> None:
    with RawClient(sim) as client:
        client.send(b"GET / HTTP/1.1\r\n\r\n")
        assert client.receive() is None


@pytest.mark.parametrize(
    "topic",
    [
        "devices/edge-device/modules/consumer/messages/events/",  # someone else's identity
        "$iothub/unknown/thing",
        "devices/edge-device/messages/devicebound/",
    ],
)
def test_publishing_to_a_topic_iot_hub_does_not_serve_disconnects(
    sim: Simulator, topic: str
) -> None:
    with RawClient(sim) as client:
        client.connect(DEVICE, "producer")
        client.send_packet(mqtt.Publish(topic, b"{}", qos=1, packet_id=1))
        assert client.receive() is None


def test_a_message_over_256_kb_disconnects(sim: Simulator) -> None:
    with RawClient(sim) as client:
        client.connect(DEVICE, "producer")
        client.send_packet(mqtt.Publish(EVENTS + "%24.on=samples", b"x" * (256 * 1024 + 1), 1, 1))
        assert client.receive() is None


def test_a_message_of_exactly_256_kb_with_properties_under_the_limit_is_accepted(
    sim: Simulator,
) -> None:
    with RawClient(sim) as client:
        client.connect(DEVICE, "producer")
        client.send_packet(mqtt.Publish(EVENTS, b"x" * (256 * 1024 - 64), 1, 1))
        assert client.receive() == mqtt.PubAck(1)


def test_a_reported_patch_that_is_not_json_gets_400(sim: Simulator) -> None:
    with RawClient(sim) as client:
        client.connect(DEVICE, "producer")
        client.send_packet(mqtt.Subscribe(1, (("$iothub/twin/res/#", 0),)))
        assert client.receive() == mqtt.SubAck(1, (0,))
        topic = "$iothub/twin/PATCH/properties/reported/?$rid=9"
        client.send_packet(mqtt.Publish(topic, b"{nope", 1, 2))
        answers = [client.receive(), client.receive()]
    assert mqtt.PubAck(2) in answers
    (response,) = [p for p in answers if isinstance(p, mqtt.Publish)]
    assert response.topic == "$iothub/twin/res/400/?$rid=9"


def _rest(
    sim: Simulator, method: str, path: str, body: bytes | None, token: str | None
) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"https://{sim.service_hostname}{path}?api-version=2021-04-12",
        data=body,
        method=method,
        headers={"Authorization": token or "", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=str(sim.ca_cert_path))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def _service_token(sim: Simulator, key: str | None = None) -> str:
    resource = sim.service_hostname
    return sas.generate(resource, key or sim.service_key, int(time.time()) + 60, "iothubowner")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("PATCH", "/twins/edge-device/modules/producer", b"{oops", 400),
        ("PATCH", "/twins/edge-device/modules/producer", b"[1]", 400),
        (
            "PATCH",
            "/twins/edge-device/modules/producer",
            b'{"properties": {"reported": {"a": 1}}}',
            400,
        ),
        (
            "PATCH",
            "/twins/edge-device/modules/producer",
            b'{"properties": {"desired": {"a.b": 1}}}',
            400,
        ),
        ("PATCH", "/twins/edge-device/modules/ghost", b"{}", 404),
        ("POST", "/twins/edge-device/modules/producer/methods", b'{"payload": 1}', 400),
        (
            "POST",
            "/twins/edge-device/modules/producer/methods",
            b'{"methodName": "m", "responseTimeoutInSeconds": -1}',
            400,
        ),
        ("POST", "/devices/query", b'{"query": 1}', 400),
        ("POST", "/devices/query", b'{"query": "SELECT name FROM things"}', 400),
    ],
)
def test_bad_rest_requests_get_iot_hub_errors(
    sim: Simulator, method: str, path: str, body: bytes, status: int
) -> None:
    answer_status, answer = _rest(sim, method, path, body, _service_token(sim))
    assert answer_status == status
    assert str(answer["Message"]).startswith("ErrorCode:")


@pytest.mark.parametrize("token", [None, "SharedAccessSignature sr=x&sig=y&se=1&skn=iothubowner"])
def test_rest_without_a_valid_token_is_unauthorized(sim: Simulator, token: str | None) -> None:
    status, _ = _rest(sim, "GET", "/twins/edge-device/modules/producer", None, token)
    assert status == 401


def test_rest_with_a_token_signed_by_another_key_is_unauthorized(sim: Simulator) -> None:
    token = _service_token(sim, key=sas.new_key())
    status, _ = _rest(sim, "GET", "/twins/edge-device/modules/producer", None, token)
    assert status == 401

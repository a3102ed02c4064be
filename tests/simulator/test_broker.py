"""Sessions: store-and-forward, bounded queues, and QoS 1 redelivery after a reconnect."""

from __future__ import annotations

import pytest

from simulator import Simulator
from simulator import mqtt_codec as mqtt
from simulator.broker import ClientIdentity, Session
from tests.simulator.conftest import DEVICE
from tests.support.raw_mqtt import RawClient

INPUTS = f"devices/{DEVICE}/modules/consumer/inputs/#"


def _session(max_queued: int = 20_000, max_queued_bytes: int = 1 << 26) -> Session:
    return Session(ClientIdentity("d", "m"), max_queued, max_queued_bytes)


def test_without_store_and_forward_nothing_waits_for_an_absent_client() -> None:
    session = _session()
    session.subscribe("$iothub/twin/res/#", 1)
    assert session.deliver("$iothub/twin/res/200/?$rid=1", b"{}") is False
    assert session.queued == 0


def test_routed_messages_wait_for_the_client() -> None:
    session = _session()
    assert session.deliver("devices/d/modules/m/inputs/in/", b"1", store_and_forward=True)
    assert session.queued == 1


@pytest.mark.parametrize(
    ("limits", "payload", "kept", "dropped"),
    [
        ({"max_queued": 3}, b"x", 3, 2),
        ({"max_queued_bytes": 10}, b"xxxx", 2, 3),
        ({"max_queued_bytes": 1}, b"xxxx", 1, 4),  # the newest is always kept
    ],
)
def test_queues_are_bounded_and_drop_the_oldest(
    limits: dict[str, int], payload: bytes, kept: int, dropped: int
) -> None:
    session = _session(**limits)
    for _ in range(5):
        session.deliver("devices/d/modules/m/inputs/in/", payload, store_and_forward=True)
    assert (session.queued, session.dropped) == (kept, dropped)


def test_unacknowledged_messages_are_sent_again_after_a_reconnect(sim: Simulator) -> None:
    with RawClient(sim) as client:
        client.connect(DEVICE, "consumer")
        client.send_packet(mqtt.Subscribe(1, ((INPUTS, 1),)))
        assert client.receive() == mqtt.SubAck(1, (1,))
        sim.send_to_input(DEVICE, "consumer", "in", "once")
        first = client.receive()
    assert isinstance(first, mqtt.Publish)
    assert (first.payload, first.dup) == (b"once", False)
    with RawClient(sim) as client:
        assert client.connect(DEVICE, "consumer") == mqtt.ConnAck(
            mqtt.ConnackCode.ACCEPTED, session_present=True
        )
        again = client.receive()
        assert isinstance(again, mqtt.Publish)
        assert (again.payload, again.dup, again.packet_id) == (b"once", True, first.packet_id)
        assert first.packet_id is not None
        client.send_packet(mqtt.PubAck(first.packet_id))
        client.send_packet(mqtt.PingReq())
        assert client.receive() == mqtt.PingResp()
    with RawClient(sim) as client:
        client.connect(DEVICE, "consumer")
        client.send_packet(mqtt.PingReq())
        assert client.receive() == mqtt.PingResp()  # nothing was sent a third time


def test_a_clean_session_forgets_subscriptions_and_messages(sim: Simulator) -> None:
    with RawClient(sim) as client:
        client.connect(DEVICE, "consumer")
        client.send_packet(mqtt.Subscribe(1, ((INPUTS, 1),)))
        client.receive()
    sim.send_to_input(DEVICE, "consumer", "in", "stale")
    with RawClient(sim) as client:
        token = sim.module_sas_token(DEVICE, "consumer", 2_000_000_000)
        client.send_packet(
            mqtt.Connect(
                f"{DEVICE}/consumer",
                f"{sim.host}/{DEVICE}/consumer/?api-version=2019-10-01",
                token,
                clean_session=True,
                keep_alive=30,
            )
        )
        assert client.receive() == mqtt.ConnAck(mqtt.ConnackCode.ACCEPTED, session_present=False)
        client.send_packet(mqtt.PingReq())
        assert client.receive() == mqtt.PingResp()


def test_a_second_connection_with_the_same_client_id_takes_over(sim: Simulator) -> None:
    with RawClient(sim) as first, RawClient(sim) as second:
        first.connect(DEVICE, "consumer")
        second.connect(DEVICE, "consumer")
        assert first.receive() is None
        second.send_packet(mqtt.PingReq())
        assert second.receive() == mqtt.PingResp()


class _ListSink:
    closing = False

    def __init__(self) -> None:
        self.sent: list[mqtt.Packet] = []

    def send(self, packet: mqtt.Packet) -> None:
        self.sent.append(packet)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_messages_older_than_their_ttl_are_not_sent() -> None:
    clock = _Clock()
    session = Session(ClientIdentity("d", "m"), clock=clock)
    topic = "devices/d/modules/m/inputs/in/"
    session.deliver(topic, b"short", store_and_forward=True, ttl_seconds=5)
    session.deliver(topic, b"long", store_and_forward=True, ttl_seconds=50)
    clock.now = 10
    sink = _ListSink()
    session.subscribe("devices/d/modules/m/inputs/#", 1)
    session.send_ready(sink)
    assert [p.payload for p in sink.sent if isinstance(p, mqtt.Publish)] == [b"long"]
    assert session.expired == 1

"""Outbox: at-least-once, in order, bounded in memory and on disk, never wedged by the hub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from module.outbox import OutboundMessage, Outbox
from tests.support.polling import poll_async


class FakeHub:
    """Takes messages while up; refuses while down; in hang mode never answers."""

    def __init__(self) -> None:
        self.up = True
        self.hang = False
        self.received: list[OutboundMessage] = []
        self.attempts = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self._changed = asyncio.Event()

    async def send(self, message: OutboundMessage) -> None:
        self.attempts += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self._changed.set()
        try:
            if self.hang:
                await asyncio.Event().wait()  # like a send stuck on a dead connection
            await asyncio.sleep(0.001)
            if not self.up:
                raise ConnectionError("edgeHub unreachable")
            self.received.append(message)
        finally:
            self.in_flight -= 1
            self._changed.set()

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Until `condition` holds, re-checked after every attempt and every delivery."""
        await poll_async(condition, timeout_s, "the fake hub's condition", changed=self._changed)

    @property
    def numbers(self) -> list[object]:
        return [json.loads(message.body)["n"] for message in self.received]

    @property
    def ids(self) -> list[str]:
        return [message.message_id for message in self.received]


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def _outbox(hub: FakeHub, spool: Path, registry: CollectorRegistry, **limits: float) -> Outbox:
    settings: dict[str, float] = {
        "max_queue": 10,
        "max_spool_bytes": 1 << 20,
        "send_timeout_s": 0.05,
        "retry_s": 0.01,
        **limits,
    }
    return Outbox(
        hub.send,
        spool,
        registry=registry,
        max_queue=int(settings["max_queue"]),
        max_spool_bytes=int(settings["max_spool_bytes"]),
        max_message_bytes=int(settings.get("max_message_bytes", 255 * 1024)),
        send_timeout_s=settings["send_timeout_s"],
        retry_s=settings["retry_s"],
    )


def _put(outbox: Outbox, numbers: range, *, pad: int = 0) -> None:
    for n in numbers:
        assert outbox.put("telemetry", {"n": n, "pad": "x" * pad}, "agent-telemetry/1")


@contextlib.asynccontextmanager
async def _running(outbox: Outbox) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(outbox.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _files(spool: Path) -> list[str]:
    return sorted(path.name for path in spool.iterdir())


def _dropped(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("agent_outbox_dropped_total", {"reason": reason})


async def test_messages_arrive_once_and_in_order_when_the_hub_is_up(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    outbox = _outbox(hub, spool, registry)
    _put(outbox, range(5))  # before the sender starts
    async with _running(outbox):
        for n in range(5, 30):
            _put(outbox, range(n, n + 1))
            await asyncio.sleep(0)
        await hub.wait_for(lambda: len(hub.received) == 30)
    assert hub.numbers == list(range(30))
    assert len(set(hub.ids)) == 30
    assert hub.most_in_flight == 1
    assert registry.get_sample_value("agent_outbox_sent_total", {"output": "telemetry"}) == 30
    assert outbox.queued == outbox.spooled == 0


async def test_a_message_carries_its_route_schema_id_and_utc_creation_time(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    outbox = _outbox(hub, spool, registry)
    assert outbox.put("alerts", {"event": "drift_alarm", "score": 0.9}, "agent-alert/1")
    async with _running(outbox):
        await hub.wait_for(lambda: len(hub.received) == 1)
    [message] = hub.received
    assert message.output == "alerts"
    assert message.schema == "agent-alert/1"
    assert json.loads(message.body.decode()) == {"event": "drift_alarm", "score": 0.9}
    assert len(message.message_id) == 32
    assert message.created.endswith("Z")


async def test_with_the_hub_down_the_queue_fills_to_its_bound_then_spills_to_disk(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    hub.up = False
    outbox = _outbox(hub, spool, registry, max_queue=5)
    async with _running(outbox):
        for n in range(20):
            _put(outbox, range(n, n + 1))
            await asyncio.sleep(0)
        await hub.wait_for(lambda: hub.attempts >= 3)
        assert hub.received == []
        assert outbox.queued == 5
        assert outbox.spooled == 15
        assert len(_files(spool)) == 15
        assert registry.get_sample_value("agent_outbox_queued") == 5
        assert registry.get_sample_value("agent_outbox_spooled") == 15


async def test_after_an_outage_everything_arrives_in_order_when_the_hub_returns(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    hub.up = False
    outbox = _outbox(hub, spool, registry, max_queue=5)
    async with _running(outbox):
        for n in range(20):
            _put(outbox, range(n, n + 1))
            await asyncio.sleep(0)
        await hub.wait_for(lambda: hub.attempts >= 5)
        hub.up = True
        await hub.wait_for(lambda: len(hub.received) == 20)
    assert hub.numbers == list(range(20))
    assert len(set(hub.ids)) == 20
    assert _files(spool) == []
    assert outbox.queued == outbox.spooled == 0
    failures = registry.get_sample_value("agent_outbox_send_failures_total")
    assert failures is not None
    assert failures >= 4


async def test_hung_sends_time_out_and_are_retried_without_growing_tasks_or_threads(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    tasks_before = len(asyncio.all_tasks())
    threads_before = threading.active_count()
    hub.hang = True
    outbox = _outbox(hub, spool, registry, send_timeout_s=0.02)
    async with _running(outbox):
        _put(outbox, range(3))
        await hub.wait_for(lambda: hub.attempts >= 6)
        assert len(asyncio.all_tasks()) == tasks_before + 1  # the sender only
        hub.hang = False
        await hub.wait_for(lambda: len(hub.received) == 3)
    assert hub.numbers == [0, 1, 2]
    assert hub.most_in_flight == 1
    assert len(asyncio.all_tasks()) == tasks_before
    assert threading.active_count() == threads_before
    failures = registry.get_sample_value("agent_outbox_send_failures_total")
    assert failures is not None
    assert failures >= 5


async def test_a_send_failure_is_logged_once_per_outage_not_per_retry(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    hub.up = False
    outbox = _outbox(hub, spool, registry)
    with capture_logs() as logs:
        async with _running(outbox):
            _put(outbox, range(2))
            await hub.wait_for(lambda: hub.attempts >= 10)
            hub.up = True
            await hub.wait_for(lambda: len(hub.received) == 2)
    events = [entry["event"] for entry in logs]
    assert events.count("outbox_send_failing") == 1
    assert events.count("outbox_send_recovered") == 1
    [recovered] = [entry for entry in logs if entry["event"] == "outbox_send_recovered"]
    assert recovered["failed_sends"] >= 9


async def test_a_full_spool_drops_the_oldest_spooled_messages_and_counts_them(
    hub: FakeHub, spool: Path, registry: CollectorRegistry, tmp_path: Path
) -> None:
    # One spooled message's size, measured on a probe: header and body are fixed width here.
    probe = _outbox(hub, tmp_path / "probe", CollectorRegistry(), max_queue=1)
    _put(probe, range(100, 102), pad=500)
    [probe_file] = (tmp_path / "probe").iterdir()
    size = probe_file.stat().st_size

    outbox = _outbox(hub, spool, registry, max_queue=2, max_spool_bytes=3 * size + size // 2)
    _put(outbox, range(100, 110), pad=500)  # 8 spilled into room for 3
    assert _dropped(registry, "spool_full") == 5
    assert outbox.spooled == 3
    assert outbox.queued == 2
    async with _running(outbox):
        await hub.wait_for(lambda: len(hub.received) == 5)
    assert hub.numbers == [105, 106, 107, 108, 109]


async def test_a_payload_too_large_is_refused_and_counted_while_later_messages_flow(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    outbox = _outbox(hub, spool, registry, max_message_bytes=1024)
    async with _running(outbox):
        assert not outbox.put("telemetry", {"n": -1, "pad": "x" * 2000}, "agent-telemetry/1")
        assert outbox.queued == 0
        _put(outbox, range(3))
        await hub.wait_for(lambda: len(hub.received) == 3)
    assert hub.numbers == [0, 1, 2]
    assert _dropped(registry, "too_large") == 1


def _circular() -> dict[str, object]:
    loop: dict[str, object] = {}
    loop["self"] = loop
    return loop


@pytest.mark.parametrize(
    "payload",
    [{"score": float("nan")}, {"score": float("inf")}, {"when": object()}, _circular()],
    ids=["nan", "infinity", "not-serialisable", "circular"],
)
def test_a_payload_that_is_not_json_is_refused_and_counted(
    hub: FakeHub, spool: Path, registry: CollectorRegistry, payload: dict[str, object]
) -> None:
    outbox = _outbox(hub, spool, registry)
    assert not outbox.put("telemetry", payload, "agent-telemetry/1")
    assert outbox.queued == 0
    assert _dropped(registry, "not_json") == 1


async def test_an_unknown_output_name_is_counted_as_other(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    outbox = _outbox(hub, spool, registry)
    assert outbox.put("debug-7f3a", {"n": 0}, "agent-debug/1")
    async with _running(outbox):
        await hub.wait_for(lambda: len(hub.received) == 1)
    assert hub.received[0].output == "debug-7f3a"
    assert registry.get_sample_value("agent_outbox_sent_total", {"output": "other"}) == 1
    assert registry.get_sample_value("agent_outbox_sent_total", {"output": "debug-7f3a"}) is None


async def test_after_a_restart_a_new_outbox_delivers_what_the_previous_one_spooled(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    crashed = _outbox(hub, spool, CollectorRegistry(), max_queue=5)
    _put(crashed, range(20))  # 0..14 reach the spool; 15..19 were only in memory
    del crashed

    outbox = _outbox(hub, spool, registry, max_queue=5)
    assert outbox.spooled == 15
    _put(outbox, range(100, 102))
    async with _running(outbox):
        await hub.wait_for(lambda: len(hub.received) == 17)
    assert hub.numbers == [*range(15), 100, 101]
    assert _files(spool) == []


async def test_drain_sends_everything_when_the_hub_is_up(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    # drain() does not retry, so one send over the 50 ms default of these tests (a busy
    # machine) would end it: this test is about order and completeness, not timeouts.
    outbox = _outbox(hub, spool, registry, max_queue=4, send_timeout_s=2.0)
    _put(outbox, range(10))
    await outbox.drain(timeout_s=2.0)
    assert hub.numbers == list(range(10))
    assert outbox.queued == outbox.spooled == 0
    assert _files(spool) == []


async def test_drain_spools_what_could_not_be_sent_and_a_restart_sends_it_in_order(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    hub.up = False
    outbox = _outbox(hub, spool, registry, max_queue=5)
    async with _running(outbox):
        _put(outbox, range(1))
        await hub.wait_for(lambda: hub.attempts >= 1)  # message 0 is in flight from memory
        _put(outbox, range(1, 8))  # 1..3 spill to disk, 4..7 stay in memory
    await outbox.drain(timeout_s=0.2)
    assert outbox.queued == 0
    assert outbox.spooled == 8
    assert len(_files(spool)) == 8

    hub.up = True
    restarted = _outbox(hub, spool, CollectorRegistry())
    async with _running(restarted):
        await hub.wait_for(lambda: len(hub.received) == 8)
    assert hub.numbers == list(range(8))


async def test_drain_returns_within_its_timeout_when_a_send_hangs(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    hub.hang = True
    outbox = _outbox(hub, spool, registry, send_timeout_s=30.0)
    _put(outbox, range(3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await outbox.drain(timeout_s=0.1)
    assert loop.time() - started < 1.0
    assert outbox.spooled == 3
    assert hub.in_flight == 0


async def test_drain_is_refused_while_run_is_active(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    outbox = _outbox(hub, spool, registry)
    async with _running(outbox):
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="before drain"):
            await outbox.drain(timeout_s=0.1)


def _plant_damaged_files(spool: Path) -> None:
    """Next to one good spool file: three unparseable ones, a crash's `.tmp` and a stranger."""
    [good] = spool.iterdir()
    data = good.read_bytes()
    (spool / "00000000000000000001.msg").write_bytes(b"garbage\n{")
    (spool / "00000000000000000002.msg").write_bytes(data[:-3])  # body cut short
    (spool / "00000000000000000003.msg").write_bytes(b"no header line at all")
    (spool / "00000000000000000004.msg.tmp").write_bytes(data[:10])  # a crash mid-write
    (spool / "notes.txt").write_bytes(b"not ours")


async def test_corrupt_and_partial_spool_files_are_removed_and_counted(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    previous = _outbox(hub, spool, CollectorRegistry(), max_queue=1)
    _put(previous, range(2))  # message 0 is spooled as the first file
    _plant_damaged_files(spool)

    outbox = _outbox(hub, spool, registry)
    assert _dropped(registry, "corrupt") == 2  # found by name at start
    _put(outbox, range(10, 11))
    async with _running(outbox):
        await hub.wait_for(lambda: len(hub.received) == 2)
    assert hub.numbers == [0, 10]
    assert _dropped(registry, "corrupt") == 5
    assert _files(spool) == []


async def test_a_spooled_message_over_a_lowered_size_limit_is_dropped_not_retried_forever(
    hub: FakeHub, spool: Path, registry: CollectorRegistry
) -> None:
    previous = _outbox(hub, spool, CollectorRegistry(), max_queue=1)
    _put(previous, range(2), pad=2000)  # message 0 is spooled

    outbox = _outbox(hub, spool, registry, max_message_bytes=1024)
    _put(outbox, range(10, 11))
    async with _running(outbox):
        await hub.wait_for(lambda: len(hub.received) == 1)
    assert hub.numbers == [10]
    assert _dropped(registry, "too_large") == 1
    assert _files(spool) == []

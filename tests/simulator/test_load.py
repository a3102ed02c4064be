"""Load: two modules exchange 5,000 messages through a route, none lost or duplicated."""

from __future__ import annotations

import asyncio
import threading
import time

from azure.iot.device import Message

from simulator import Simulator
from tests.simulator.conftest import ClientFactory
from tests.support.inbox import sdk_message

MESSAGES = 5_000
CONCURRENT_SENDS = 100


async def test_five_thousand_messages_cross_a_route_exactly_once(
    sim: Simulator, module_client: ClientFactory
) -> None:
    producer = await module_client("producer")
    consumer = await module_client("consumer")
    received: list[str] = []
    all_arrived = asyncio.Event()
    loop = asyncio.get_running_loop()
    lock = threading.Lock()

    def on_message(message: Message) -> None:  # runs on the SDK's handler thread
        with lock:
            received.append(message.message_id)
            if len(received) == MESSAGES:
                loop.call_soon_threadsafe(all_arrived.set)

    consumer.on_message_received = on_message
    slots = asyncio.Semaphore(CONCURRENT_SENDS)

    async def send(number: int) -> None:
        async with slots:
            message = sdk_message(f'{{"n": {number}}}', message_id=f"m{number}")
            await producer.send_message_to_output(message, "samples")

    started = time.monotonic()
    await asyncio.gather(*(send(number) for number in range(MESSAGES)))
    await asyncio.wait_for(all_arrived.wait(), 90)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.3)  # a duplicate would arrive now
    with lock:
        assert sorted(received) == sorted(f"m{number}" for number in range(MESSAGES))
    assert elapsed < 60  # about 6 s on an idle 2-core machine; generous for a loaded CI box

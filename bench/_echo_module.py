"""`python -m bench._echo_module`: the agent's route path through the SDK, minus inference.

The baseline of `bench.route`. It connects as its own module identity with
`IoTHubModuleClient.create_from_edge_environment()` and relays every message on input `infer`
to output `predictions` with the same body and the request's correlation id, the way
`module/edge.py` answers one: the SDK's handler thread hands the message to the event loop
(`call_soon_threadsafe` onto a bounded queue), one task per message sends a new JSON message
(a fresh message id, the `schema` property) under a timeout, with at most
`MAX_IN_FLIGHT` sends at once. Only decoding, inference and encoding are left out.

With `BENCH_ECHO_ONNX=<model.onnx>` (a diagnostic of `bench.route --echo-onnx`) it also runs
that model once per message on the event loop, on a zero input of its first input's shape,
with the agent's session options: the one thing of the agent's inference that leaves Python
(ONNX Runtime releases the GIL for the call) without the agent's decoding and encoding. On
exit it prints what those calls cost the event loop: wall time (the loop waits that long,
GIL re-acquisition included) against the thread's CPU time.

Exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient

INFER_INPUT = "infer"
PREDICTIONS = "predictions"
SCHEMA = "bench-echo/1"
# The agent's defaults (module/settings.py): max_route_in_flight, max_queued_messages and
# call_timeout_s, so both sides queue and bound the same way.
MAX_IN_FLIGHT = 256
MAX_QUEUED = 4096
CALL_TIMEOUT_S = 30.0


def _onnx_runner(path: Path) -> Callable[[], object]:
    """One call of the model at `path` per invocation, as the agent runs a small model inline."""
    import numpy as np  # noqa: PLC0415  # only the diagnostic pays for these imports
    import onnxruntime as ort  # noqa: PLC0415

    from agent.serving.engine import RuntimeOptions  # noqa: PLC0415

    session = ort.InferenceSession(
        path.read_bytes(),
        sess_options=RuntimeOptions().session_options(),
        providers=["CPUExecutionProvider"],
    )
    first = session.get_inputs()[0]
    shape = [1 if not isinstance(dim, int) else dim for dim in first.shape]
    feed = {first.name: np.zeros(shape, dtype=np.float32)}
    names = [output.name for output in session.get_outputs()]
    return lambda: session.run(names, feed)


class EchoModule:
    def __init__(
        self, client: IoTHubModuleClient, work: Callable[[], object] | None = None
    ) -> None:
        self._client = client
        self._work = work
        self._loop = asyncio.get_running_loop()
        self._messages: asyncio.Queue[Message] = asyncio.Queue(MAX_QUEUED)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        # The same message ids as module/routes.py: a random prefix (drawn once) and a counter.
        prefix = uuid.uuid4().hex
        self._ids = (f"{prefix}-{n}" for n in itertools.count())
        self.dropped = 0
        self.failed = 0
        self.work_calls = 0
        self.work_wall_s = 0.0
        self.work_cpu_s = 0.0

    def on_message(self, message: Message) -> None:
        """Runs on an SDK thread: only hands the message over."""
        self._loop.call_soon_threadsafe(self._enqueue, message)

    def _enqueue(self, message: Message) -> None:
        try:
            self._messages.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        while True:
            message = await self._messages.get()
            if message.input_name != INFER_INPUT:
                continue
            await self._slots.acquire()
            task = self._loop.create_task(self._relay(message))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _relay(self, request: Message) -> None:
        if self._work is not None:
            wall, cpu = time.perf_counter(), time.thread_time()
            self._work()
            self.work_wall_s += time.perf_counter() - wall
            self.work_cpu_s += time.thread_time() - cpu
            self.work_calls += 1
        body = request.data if isinstance(request.data, bytes) else str(request.data).encode()
        reply: Message = Message(  # type: ignore[no-untyped-call]  # the SDK is unannotated
            body,
            message_id=next(self._ids),
            content_encoding="utf-8",
            content_type="application/json",
        )
        reply.custom_properties["schema"] = SCHEMA
        reply.correlation_id = request.correlation_id or request.message_id
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self._client.send_message_to_output(reply, PREDICTIONS)
        except Exception as error:  # like the agent: count, say so, keep relaying
            self.failed += 1
            print(f"echo: send failed: {error!r}", file=sys.stderr, flush=True)


def _install_handler(client: IoTHubModuleClient, echo: EchoModule) -> None:
    client.on_message_received = echo.on_message


async def _main() -> int:
    client = IoTHubModuleClient.create_from_edge_environment()
    model = os.environ.get("BENCH_ECHO_ONNX")
    echo = EchoModule(client, _onnx_runner(Path(model)) if model else None)
    # The SDK's handler setter blocks until its handler thread runs: not on this loop.
    await asyncio.to_thread(_install_handler, client, echo)
    await client.connect()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = loop.create_task(echo.run())
    await stop.wait()
    relay.cancel()
    await client.shutdown()
    print(f"echo: stopped; dropped={echo.dropped} failed={echo.failed}", file=sys.stderr)
    if echo.work_calls:
        wall_us = echo.work_wall_s / echo.work_calls * 1e6
        cpu_us = echo.work_cpu_s / echo.work_calls * 1e6
        print(
            f"echo: {echo.work_calls} model calls on the loop: {wall_us:.1f} us wall, "
            f"{cpu_us:.1f} us CPU each",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))

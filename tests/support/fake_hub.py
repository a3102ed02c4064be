"""A fake `IoTHubModuleClient` that behaves like the SDK where the module can tell.

Handlers are set as attributes and called on a thread of the fake's own, as the SDK calls
them on its handler threads; calls are coroutines; a twin has `desired` and `reported`, and a
reported patch is merged like the hub merges it (null removes). For unit tests of the module's
pieces through its `client_factory` seam; the end-to-end tests use the real SDK.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

from azure.iot.device import Message, MethodRequest, MethodResponse

from module.desired import merge_patch


class FakeModuleClient:
    def __init__(self, desired: Mapping[str, Any] | None = None, *, reachable: bool = True) -> None:
        self.desired: dict[str, Any] = {"$version": 1, **(desired or {})}
        self.reported: dict[str, Any] = {}
        self.reachable = reachable
        self.connected = False
        self.patches: list[dict[str, Any]] = []
        self.outputs: list[tuple[str, Message]] = []
        self.method_responses: list[MethodResponse] = []
        self.on_twin_desired_properties_patch_received: Callable[[dict[str, Any]], None] | None
        self.on_twin_desired_properties_patch_received = None
        self.on_message_received: Callable[[Message], None] | None = None
        self.on_method_request_received: Callable[[MethodRequest], None] | None = None
        self.on_connection_state_change: Callable[[], None] | None = None
        self.changed = asyncio.Event()  # set on every reported patch, output and response

    # -- what the module calls -------------------------------------------------------

    async def connect(self) -> None:
        if not self.reachable:
            raise ConnectionError("the hub is unreachable")
        self.connected = True

    async def get_twin(self) -> dict[str, Any]:
        return {"desired": copy.deepcopy(self.desired), "reported": copy.deepcopy(self.reported)}

    async def patch_twin_reported_properties(self, patch: dict[str, Any]) -> None:
        self.patches.append(copy.deepcopy(patch))
        self.reported = merge_patch(self.reported, patch)
        self.changed.set()

    async def send_message_to_output(self, message: Message, output: str) -> None:
        self.outputs.append((output, message))
        self.changed.set()

    async def send_method_response(self, response: MethodResponse) -> None:
        self.method_responses.append(response)
        self.changed.set()

    async def shutdown(self) -> None:
        self.connected = False

    # -- what the hub does: handlers run on another thread, like the SDK's -------------

    def patch_desired(self, patch: Mapping[str, Any]) -> None:
        """The operator patches desired properties; the module hears it on an SDK thread."""
        self.desired = merge_patch(self.desired, patch)
        self.desired["$version"] = version = int(self.desired.get("$version", 0)) + 1
        handler = self.on_twin_desired_properties_patch_received
        assert handler is not None, "the module set no patch handler"
        _on_thread(handler, {**copy.deepcopy(dict(patch)), "$version": version})

    def call_method(self, name: str, payload: Any = None, request_id: str = "1") -> None:
        handler = self.on_method_request_received
        assert handler is not None, "the module set no method handler"
        _on_thread(handler, MethodRequest(request_id, name, payload))

    def send_route_message(self, message: Message) -> None:
        handler = self.on_message_received
        assert handler is not None, "the module set no message handler"
        _on_thread(handler, message)


def _on_thread(handler: Callable[[Any], None], item: Any) -> None:
    thread = threading.Thread(target=handler, args=(item,), name="fake-sdk-handler")
    thread.start()
    thread.join(5)

"""Every boundary that parses outside input, fuzzed: arbitrary bytes, arbitrary JSON and JSON
nested far past any limit never raise anything but the boundary's own error.

Under the default hypothesis profile each test runs a few dozen examples (all of them together
take seconds); `--hypothesis-profile=fuzz` or `FUZZ=1` runs thousands (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from azure.iot.device import Message
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from agent.observation.baseline import BaselineInvalidError, parse_baseline
from agent.observation.metrics import InferenceMetrics, LoopFailures
from agent.profiler import read_profile
from agent.releases.lifecycle import SwapError
from agent.releases.manifest import ManifestRejected, load_manifest_json, verify_manifest
from agent.serving.contract import RequestError
from agent.serving.protocol import decode_infer_request
from agent.serving.v2 import ModelMetadataView
from deployment.drift.report import read_profiles
from deployment.errors import PublisherError
from module.connection import HubConnection
from module.desired import Apply, Ignore, Reconciler, Reject
from module.feedback import parse_feedback
from module.methods import DirectMethods
from module.routes import InferRoute, RouteMetrics
from wire.reasons import Reason

# -- what a hostile sender can send ------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=24,
)
# Keys the boundaries know, so that fuzzed documents get past the first field check.
KEYS = ["id", "label", "inputs", "name", "shape", "datatype", "data", "outputs", "parameters",
        "model", "models", "drift", "telemetry", "seconds", "schema", "recommendation",
        "features", "Body", "signature", "version"]  # fmt: skip
known_documents = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


@st.composite
def deep_values(draw: st.DrawFn) -> object:
    """A list or object nested 1..3000 levels (past Python's recursion limit), around a value."""
    depth = draw(st.integers(min_value=1, max_value=3000))
    value: object = draw(scalars)
    kinds = draw(st.lists(st.booleans(), min_size=1, max_size=8))
    for level in range(depth):
        value = [value] if kinds[level % len(kinds)] else {draw(st.sampled_from(KEYS)): value}
    return value


def _dumps(value: object) -> bytes:
    # The stdlib encoder recurses: for the deepest values, the text is built by hand.
    try:
        return json.dumps(value).encode()
    except RecursionError:
        return _deep_text(value)


def _deep_text(value: object) -> bytes:
    opened: list[bytes] = []
    while isinstance(value, list | dict):
        if isinstance(value, list):
            opened.append(b"[")
            value = value[0]
        else:
            ((key, value),) = value.items()
            opened.append(b"{" + json.dumps(key).encode() + b":")
    closers = b"".join(b"]" if o == b"[" else b"}" for o in reversed(opened))
    return b"".join(opened) + json.dumps(value).encode() + closers


@st.composite
def mutated(draw: st.DrawFn, documents: st.SearchStrategy[bytes]) -> bytes:
    """A valid document cut short, or with bytes flipped in it."""
    data = bytearray(draw(documents))
    if data and draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


documents = st.one_of(known_documents, json_values, deep_values()).map(_dumps)
hostile_bytes = st.one_of(st.binary(max_size=2048), documents, mutated(documents))
hostile_values = st.one_of(known_documents, json_values, deep_values())


# -- device: route messages and the HTTP body ---------------------------------------------------


@given(hostile_bytes)
def test_feedback_raises_only_value_error(body: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_feedback(body)


class EchoModel:
    """A served model that answers each input as an output of the same name."""

    name = "m"
    ready = True

    def metadata(self) -> ModelMetadataView:
        raise NotImplementedError

    async def infer_versioned(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        request_id: str | None = None,
    ) -> tuple[int, dict[str, np.ndarray]]:
        return 1, dict(inputs)


def _unused_client() -> Any:
    raise AssertionError("the route is fuzzed without a hub")


def _route() -> InferRoute:
    registry = CollectorRegistry()
    routes = RouteMetrics(registry)
    connection = HubConnection(
        _unused_client,
        registry,
        call_timeout_s=1.0,
        offline_budget_s=60.0,
        max_queued_messages=8,
        on_dropped=lambda: None,
    )
    return InferRoute(
        connection,
        {"m": EchoModel()},
        InferenceMetrics(registry),
        routes,
        default_model=lambda: "m",
        max_in_flight=1,
        max_input_bytes=64 * 1024,
    )


@given(hostile_bytes)
def test_an_infer_route_message_raises_only_request_error(body: bytes) -> None:
    route = _route()
    message = Message(body, message_id="fuzz")  # type: ignore[no-untyped-call]  # unannotated SDK
    with contextlib.suppress(RequestError):
        asyncio.run(route.predict(message))


@given(hostile_bytes, st.none() | st.integers(0, 4096))
def test_an_http_body_raises_only_request_error(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(RequestError):
        decode_infer_request(body, header_length, max_input_bytes=64 * 1024)


# -- device: the twin, direct methods, manifests and baseline packs ----------------------------


@given(st.integers(1, 5), hostile_values, st.booleans())
def test_a_desired_document_is_an_action_never_an_exception(
    version: int, value: object, patch: bool
) -> None:
    document = {"$version": version, **(value if isinstance(value, dict) else {"models": value})}
    reconciler = Reconciler()
    _, action = reconciler.patch(document) if patch else reconciler.full(document)
    assert isinstance(action, Apply | Reject | Ignore)
    if isinstance(action, Reject):
        assert action.reason in (Reason.DESIRED_INVALID, Reason.TOO_MANY_MODELS)


class RefusingManager:
    """The model manager, as far as `rollback` goes: there is never anything to go back to."""

    async def rollback(self, name: str) -> object:
        raise SwapError(Reason.NO_LAST_KNOWN_GOOD, f"nothing to roll {name} back to")


def _methods(failures: LoopFailures) -> DirectMethods:
    registry = CollectorRegistry()
    connection = HubConnection(
        _unused_client,
        registry,
        call_timeout_s=1.0,
        offline_budget_s=60.0,
        max_queued_messages=8,
        on_dropped=lambda: None,
    )
    return DirectMethods(
        connection,
        RefusingManager(),  # type: ignore[arg-type]  # a fake of the one method called
        InferenceMetrics(registry),
        registry,
        status=lambda: {"ok": True},
        default_model=lambda: None,
        failures=failures,
    )


@given(st.sampled_from(["status", "rollback", "nope"]), hostile_values | st.text(max_size=32))
def test_a_method_payload_is_an_answer_never_an_exception(name: str, payload: object) -> None:
    failures = LoopFailures()
    status, body = asyncio.run(_methods(failures).result(name, payload))
    assert status in (200, 400, 404, 409)
    assert isinstance(body, dict)
    assert failures.counts["method"] == 0  # refused as a bad payload, not failed as a bug


KEYS_BY_ID = {"k": Ed25519PrivateKey.from_private_bytes(b"\x01" * 32).public_key()}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@given(hostile_values, st.booleans())
def test_a_manifest_from_the_twin_raises_only_manifest_rejected(raw: object, sign: bool) -> None:
    # `sign`, not anything computed from `raw`: str() of a value 3,000 deep recurses itself.
    if isinstance(raw, dict) and raw.get("signature") is None and sign:
        raw = {**raw, "signature": {"key_id": "k", "value": "AAAA"}}  # reach past the first check
    with contextlib.suppress(ManifestRejected):
        verify_manifest(raw, KEYS_BY_ID, NOW)


@given(hostile_bytes)
def test_a_manifest_file_raises_only_manifest_rejected(data: bytes) -> None:
    with contextlib.suppress(ManifestRejected):
        verify_manifest(load_manifest_json(data), KEYS_BY_ID, NOW)


@given(hostile_bytes)
def test_a_baseline_pack_raises_only_baseline_invalid(data: bytes) -> None:
    with contextlib.suppress(BaselineInvalidError):
        parse_baseline(data)


# -- cloud side: profile records and profile.json ----------------------------------------------


@given(hostile_bytes, st.booleans())
def test_a_profile_record_file_raises_only_publisher_error(data: bytes, lines: bool) -> None:
    if lines:  # one record per line, as message routing writes them
        data = data.replace(b"\n", b" ") + b"\n" + data.replace(b"\n", b" ")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "routed.json"
        path.write_bytes(data)
        with contextlib.suppress(PublisherError):
            read_profiles([path])


@given(hostile_bytes)
def test_profile_json_raises_only_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        read_profile(data)


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_each_boundary_names_a_bomb_as_too_deep(depth: int) -> None:
    bomb = b"[" * depth + b"]" * depth
    with pytest.raises(ValueError, match="too_deep"):
        parse_feedback(bomb)
    with pytest.raises(RequestError, match="levels deep") as raised:
        decode_infer_request(bomb, max_input_bytes=1 << 20)
    assert raised.value.reason is Reason.BAD_JSON
    with pytest.raises(ManifestRejected, match="too_deep"):
        load_manifest_json(bomb[:30_000] if depth > 10_000 else bomb)
    with pytest.raises(BaselineInvalidError, match="too_deep"):
        parse_baseline(bomb)
    with pytest.raises(ValueError, match="too_deep"):
        read_profile(bomb)

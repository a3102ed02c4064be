"""The module's pieces through the `client_factory` seam: a fake client that calls handlers
from another thread, like the SDK; a real agent (store, manager, HTTP) on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from agent.app import App
from agent.observation.limits import Limits
from agent.releases.lifecycle import ModelState, ModelStatus, ProbationReport, ProbationState
from agent.releases.manifest import (
    KeySettings,
    ManifestRejected,
    public_key_to_b64,
    sign_manifest,
    verify_manifest,
)
from agent.releases.store import StoreSettings
from agent.serving.http import HttpSettings
from agent.settings import AgentSettings
from module.connection import HubUnreachable
from module.edge import EdgeModule
from module.reported import EntrySections, ModelEntries
from module.routes import RouteMetrics
from module.settings import ModuleSettings
from tests.support.fake_hub import FakeModuleClient
from tests.support.polling import poll_async
from wire.reasons import Reason
from wire.reported import ModelHealth, to_twin

SHA = "a" * 64


@dataclass
class Running:
    client: FakeModuleClient
    edge: EdgeModule
    app: App
    task: asyncio.Task[None]

    async def until(self, condition: Callable[[], Any], what: str) -> Any:
        """`condition()`'s first truthy value, within 10 s (a loaded machine is slow)."""
        return await poll_async(condition, 10, what, changed=self.client.changed)


def _manifest(name: str, version: int = 1) -> dict[str, Any]:
    unsigned = {
        "name": name,
        "version": version,
        "sha256": SHA,
        "size": 1024,
        "url": "https://models.blob.core.windows.net/m.onnx?sig=x",
        "created": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "contract": {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        },
    }
    return sign_manifest(unsigned, Ed25519PrivateKey.generate(), "k")  # not a trusted key


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    runs: list[Running] = []

    async def start_edge(
        client: FakeModuleClient, limits: Limits | None = None, **module: Any
    ) -> Running:
        key = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
        settings = AgentSettings(
            store=StoreSettings(state_dir=tmp_path / "state"),
            keys=KeySettings(trusted_keys=f"k={key}"),
            http=HttpSettings(host="127.0.0.1", http_port=0, metrics_port=0),
        )
        edge = EdgeModule(
            settings,
            ModuleSettings(spool_dir=tmp_path / "spool", **module),
            limits=limits,
            # The fake stands in for the SDK class where the module can tell.
            client_factory=lambda: cast(IoTHubModuleClient, client),
        )
        app = App(edge.agent.services_in_start_order(edge), grace_s=2.0, handle_signals=False)
        running = Running(client, edge, app, asyncio.ensure_future(app.run()))
        runs.append(running)
        return running

    yield start_edge
    for running in runs:
        running.app.request_stop("test over")
        await asyncio.gather(running.task, return_exceptions=True)


async def test_forged_manifests_are_reported_as_rejected_and_change_no_model(
    start: Callable[..., Any],
) -> None:
    client = FakeModuleClient({"models": {"m": _manifest("m")}})
    run = await start(client)
    reported = await run.until(
        lambda: client.reported.get("rejected", {}).get("m"), "the rejection reported"
    )
    assert reported["reason"] == "signature_invalid"  # trusted key id, another key
    client.patch_desired({"models": {"other": _manifest("other")}})
    await run.until(lambda: "other" in client.reported.get("rejected", {}), "other rejected")
    assert "models" not in client.reported or not client.reported["models"]
    assert run.edge.default_model() is None  # a refused manifest never becomes the default
    assert client.reported["desired"]["state"] == "applied"
    alerts = [json.loads(m.data) for output, m in client.outputs if output == "alerts"]
    assert [a["kind"] for a in alerts] == ["manifest_rejected", "manifest_rejected"]


async def test_an_entry_a_previous_run_left_for_a_model_it_removed_leaves_the_twin(
    start: Callable[..., Any],
) -> None:
    client = FakeModuleClient({"models": {"m": _manifest("m")}})
    client.reported = {"models": {"gone": {"version": 3, "state": "active"}}}
    run = await start(client)
    await run.until(lambda: "gone" not in client.reported.get("models", {}), "gone removed")
    await run.until(lambda: client.reported.get("rejected", {}).get("m"), "m answered")
    removals = [p for p in client.patches if "gone" in p.get("models", {})]
    assert [p["models"]["gone"] for p in removals] == [None]  # sent once, as a null


@pytest.mark.parametrize(
    ("desired", "reason", "fragment"),
    [
        ({"models": {f"m{i}": _manifest(f"m{i}") for i in range(3)}}, "too_many_models", "3"),
        ({"models": {}, "model": _manifest("m")}, "desired_invalid", "not both"),
        ({"models": {"m": "not a manifest"}}, "desired_invalid", "models.m"),
    ],
    ids=["too-many", "both-forms", "not-an-object"],
)
async def test_a_bad_models_map_is_rejected_as_a_whole(
    start: Callable[..., Any], desired: dict[str, Any], reason: str, fragment: str
) -> None:
    client = FakeModuleClient(desired)
    run = await start(client, max_models=2)
    report = await run.until(
        lambda: (
            client.reported.get("desired", {}).get("state") == "rejected"
            and client.reported["desired"]
        ),
        "the desired document rejected",
    )
    assert report["reason"] == reason
    assert fragment in report["message"]
    assert "rejected" not in client.reported  # nothing was submitted


async def test_a_manifest_under_another_models_key_is_refused_by_name(
    start: Callable[..., Any],
) -> None:
    client = FakeModuleClient({"models": {"m": _manifest("other")}})
    run = await start(client)
    entry = await run.until(
        lambda: client.reported.get("rejected", {}).get("m"), "the mismatch reported"
    )
    assert entry["reason"] == "name_mismatch"
    assert "'other'" in entry["message"]
    assert run.edge.connection.connected


async def test_direct_methods_answer_on_the_sdk_thread_hand_off(
    start: Callable[..., Any],
) -> None:
    client = FakeModuleClient()
    run = await start(client)
    await run.until(lambda: run.edge.connection.connected, "connected")
    client.call_method("status", None, "1")
    client.call_method("reboot", {}, "2")
    client.call_method("rollback", {}, "3")
    await run.until(lambda: len(client.method_responses) == 3, "three responses")
    by_id = {r.request_id: r for r in client.method_responses}
    assert by_id["1"].status == 200
    status = by_id["1"].payload
    assert isinstance(status, dict)
    assert status["hub_connected"] is True
    assert by_id["2"].status == 404
    assert by_id["3"].status == 400  # nothing served: no model to roll back


async def test_a_route_message_for_no_model_is_answered_with_its_error(
    start: Callable[..., Any],
) -> None:
    client = FakeModuleClient()
    run = await start(client)
    await run.until(lambda: run.edge.connection.connected, "connected")
    message = Message(b'{"inputs": []}', message_id="q1")  # type: ignore[no-untyped-call]
    message.input_name = "infer"
    message.custom_properties["model"] = "m"
    client.send_route_message(message)
    _, answer = await run.until(
        lambda: next((o for o in client.outputs if o[0] == "predictions"), None), "an answer"
    )
    assert answer.correlation_id == "q1"
    assert answer.custom_properties["schema"] == "oip-v2-error/1"
    assert "unknown model 'm'" in json.loads(answer.data)["error"]


async def test_a_hub_unreachable_past_the_budget_fails_run(start: Callable[..., Any]) -> None:
    client = FakeModuleClient(reachable=False)
    run = await start(client, offline_budget_s=0.3)
    with pytest.raises(ExceptionGroup) as failed:
        async with asyncio.timeout(10):
            await run.task
    assert failed.group_contains(HubUnreachable)


def test_eight_models_report_far_under_the_twin_limit() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    statuses = {
        f"model-{i:02d}-" + "x" * 50: ModelStatus(
            name=f"model-{i:02d}-" + "x" * 50,
            version=2**31,
            sha256=SHA,
            state=ModelState.ROLLED_BACK,
            reason=Reason.PROBATION_LATENCY,
            message="m" * 500,  # the longest message a status keeps
            since=since,
            active_version=2**31 - 1,
        )
        for i in range(8)
    }
    probation = ProbationReport(ProbationState.FAILED, 10**9, 0.123456, 3.14159, 2.71828, since)
    health = {
        "requests": 10**9,
        "error_rate": 0.1234,
        "p50_ms": 0.123,
        "p99_ms": 2500.0,
        "window_s": 86400.0,
    }
    entries = ModelEntries(
        statuses,
        EntrySections(
            probation=lambda name: probation.entry(),
            health=lambda name: ModelHealth.model_validate(health),
        ),
    )
    size = len(json.dumps(entries.patch(statuses)).encode())
    assert size < 12 * 1024, size  # the twin takes 32 KB: room for drift and quality


def test_an_entry_without_a_status_holds_its_sections_only() -> None:
    entries = ModelEntries({}, EntrySections(drift=lambda name: None))
    assert to_twin(entries.entry("m")) == {
        "probation": None,
        "health": None,
        "drift": None,
        "quality": None,
    }


def test_the_fake_signature_is_really_refused() -> None:
    """The tests' forged manifests carry a well-formed signature under the trusted key id "k",
    made by another key: the agent's own check refuses it as `signature_invalid`."""
    manifest = _manifest("m")
    assert base64.b64decode(manifest["signature"]["value"])  # a real Ed25519 signature
    trusted = {"k": Ed25519PrivateKey.generate().public_key()}
    with pytest.raises(ManifestRejected) as refused:
        verify_manifest(manifest, trusted, datetime.now(UTC))
    assert refused.value.reason is Reason.SIGNATURE_INVALID


async def test_memory_headroom_under_the_threshold_raises_one_alert_and_is_reported(
    start: Callable[..., Any],
) -> None:
    """A memory limit a few MiB over the process's RSS: well under 10 % of headroom."""
    limit = psutil.Process().memory_info().rss + (8 << 20)
    client = FakeModuleClient({"telemetry": {"interval_s": 1.0}})
    run = await start(client, Limits("v2", limit, 1.0, 2), memory_check_interval_s=0.05)

    def alerts() -> list[dict[str, Any]]:
        sent = [json.loads(m.data) for output, m in client.outputs if output == "alerts"]
        return [a for a in sent if a["kind"].startswith("memory_headroom")]

    await run.until(alerts, "a headroom alert")
    profile = await run.until(lambda: client.reported.get("profile"), "the reported profile")
    assert profile["memory_limit_mb"] == round(limit / 2**20, 1)
    assert profile["memory_headroom_mb"] < 0.1 * profile["memory_limit_mb"]
    await asyncio.sleep(0.3)  # several more checks: still low, no second alert
    assert [a["kind"] for a in alerts()] == ["memory_headroom_low"]
    assert alerts()[0]["details"]["memory_limit_mb"] == profile["memory_limit_mb"]


@pytest.mark.parametrize(
    ("namespace", "exported"),
    [(None, "agent_route_messages_total"), ("edge", "edge_route_messages_total")],
)
def test_route_metrics_are_exported_under_their_namespace(
    namespace: str | None, exported: str
) -> None:
    registry = CollectorRegistry()
    metrics = RouteMetrics(registry) if namespace is None else RouteMetrics(registry, namespace)
    metrics.messages.labels("answered").inc()
    assert registry.get_sample_value(exported, {"outcome": "answered"}) == 1

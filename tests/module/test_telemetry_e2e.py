"""Telemetry spooled while the hub is down reaches it after it returns."""

from __future__ import annotations

import itertools
import time
from datetime import datetime

import pytest

from simulator import Simulator
from simulator.core import UpstreamMessage
from tests.module.conftest import StartModule
from tests.support.module_e2e import publish_v1
from tests.support.module_process import MODULE
from tests.support.module_releases import Releases
from tests.support.polling import poll
from tests.support.service_sdk import Service

pytestmark = pytest.mark.e2e


def test_telemetry_spooled_while_the_hub_is_down_is_delivered_after_it_returns(
    sim: Simulator, service: Service, releases: Releases, start_module: StartModule
) -> None:
    """An outage (shortened): sends time out while the hub is away; nothing is lost or doubled,
    and the process does not grow threads."""
    module = start_module({"EDGEML_MODULE_CALL_TIMEOUT_S": "2"})
    publish_v1(service, releases)
    service.update_desired({"telemetry": {"interval_s": 1.0}})
    sim.upstream.wait_for_count(telemetry, 3, timeout=20)
    threads_before = module.psutil.num_threads()
    last = [m for m in sim.upstream.items() if telemetry(m)][-1].json()
    assert last["resources"]["threads"] >= 1
    assert last["models"]["m"]["state"] == "active"
    assert "latency_p99_ms" in last["models"]["m"]["profile"]
    profile = service.wait_reported(lambda r: "profile" in r, 20, "a profile")["profile"]
    assert profile["rss_mb"] > 0
    assert set(profile["models"]) == {"m"}

    down_at, back_at = _outage(sim, 10)
    # Everything put while offline arrives, then telemetry keeps flowing.
    poll(
        lambda: [m for m in sim.upstream.items() if telemetry(m) and _sent_at(m) > back_at + 3],
        30,
        "telemetry after the outage",
    )
    messages = [m for m in sim.upstream.items() if telemetry(m)]
    ids = [m.message.system["messageId"] for m in messages]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    stamps = sorted(_sent_at(m) for m in messages)
    offline = [t for t in stamps if down_at < t < back_at]
    assert len(offline) >= 8, f"only {len(offline)} messages from the outage arrived"
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert max(gaps) < 2.5, f"a telemetry message is missing: a {max(gaps):.1f} s gap"
    for reason in ("too_large", "spool_full", "corrupt", "not_json"):
        assert module.metric("agent_outbox_dropped_total", {"reason": reason}) == 0
    assert (module.metric("agent_outbox_send_failures_total") or 0) > 0, "sends did fail"
    assert module.events("hub_connection")[-1]["connected"] is True

    # Thread pools fill lazily up to their bounds, so the first outage may add a thread; a
    # second one must not add any more.
    threads_after_first = module.psutil.num_threads()
    _outage(sim, 4)
    poll(
        lambda: [m for m in sim.upstream.items() if telemetry(m) and _sent_at(m) > time.time() - 1],
        30,
        "telemetry after the second outage",
    )
    threads_after_second = module.psutil.num_threads()
    print(f"threads: {threads_before} before, {threads_after_first}, {threads_after_second} after")
    assert threads_after_second <= threads_after_first <= threads_before + 2


def _outage(sim: Simulator, seconds: float) -> tuple[float, float]:
    """Drop the module's link and refuse it for `seconds`; (down at, back at), wall clock."""
    sim.faults.refuse_connections(sim.device_id, MODULE, seconds)
    assert sim.faults.drop_connection(sim.device_id, MODULE)
    down_at = time.time()
    poll(lambda: not sim.is_connected(sim.device_id, MODULE), 10, "the module offline")
    poll(lambda: sim.is_connected(sim.device_id, MODULE), 60, "the module back", interval=0.25)
    back_at = time.time()
    assert back_at - down_at >= seconds - 0.5
    return down_at, back_at


def telemetry(message: UpstreamMessage) -> bool:
    return message.output == "telemetry"


def _sent_at(message: UpstreamMessage) -> float:
    return datetime.fromisoformat(message.json()["at"]).timestamp()

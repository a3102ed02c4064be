"""Hostile models against a real `python -m agent serve`: bombs fail in quarantine and are not
retried after a restart; a release the process dies installing (SIGKILL at each step) is rolled
back at the next start and installed once more when offered again; a second death installing it
blocks it for good."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import public_key_to_b64
from agent.releases.state import StoreState
from deployment.publish.release import build_manifest
from tests.support import bombs
from tests.support.agent_process import AgentProcess, LogLine, model_status, running_agent
from tests.support.folder_release import FolderRelease
from tests.support.models import MID_FEATURES, TINY_FEATURES, mid_bytes, tiny_bytes

pytestmark = pytest.mark.e2e

KEY = Ed25519PrivateKey.generate()
WAIT_S = 60.0  # one process step on a loaded machine; a healthy run takes a fraction
CRASH_GUARD_REQUESTS = 5
ENV = {
    "EDGEML_TRUSTED_KEYS": f"k={public_key_to_b64(KEY.public_key())}",
    "EDGEML_WATCH_DEBOUNCE_S": "0.05",
    "EDGEML_SHUTDOWN_GRACE_S": "5",
    # The device stand-in: a candidate may allocate 512 MiB and use 5 s of CPU.
    "EDGEML_QUARANTINE_MEMORY_BYTES": str(512 << 20),
    "EDGEML_QUARANTINE_CPU_S": "5",
    "EDGEML_QUARANTINE_WALL_S": "30",
    "EDGEML_CRASH_GUARD_REQUESTS": str(CRASH_GUARD_REQUESTS),
    "EDGEML_PROBATION_TICK_S": "0.1",
}


def release(model: bytes, version: int, features: int, *, golden: bool = True) -> FolderRelease:
    manifest = build_manifest(
        model,
        name="m",
        version=version,
        url=f"https://models.example/m/v{version}.onnx",
        key=KEY,
        key_id="k",
        golden_atol=1e-4 if golden else None,  # a bomb cannot be run to make its sample
        contract_change=True,
    )
    return FolderRelease(model, manifest, features)


@contextmanager
def agent_on(root: Path) -> Iterator[AgentProcess]:
    args = ("--state-dir", str(root / "state"), "--watch-dir", str(root / "watch"))
    (root / "watch").mkdir(exist_ok=True)
    with running_agent(None, *args, env=ENV) as agent:
        yield agent


def infer(agent: AgentProcess, features: int) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, features],
                        "data": [0.5] * features}]}  # fmt: skip
    request = urllib.request.Request(
        f"{agent.http_url}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def served_version(agent: AgentProcess) -> int:
    with urllib.request.urlopen(f"{agent.http_url}/v2/models/m", timeout=10) as response:
        return int(json.loads(response.read())["versions"][0])


def record(root: Path) -> Any:
    return StoreState.from_json_bytes((root / "state" / "state.json").read_bytes()).record("m")


V1 = release(tiny_bytes(0), 1, TINY_FEATURES)
BOMBS = [
    ("constant_of_shape", "resource_limit"),
    ("expand", "resource_limit"),
    ("tile", "resource_limit"),
    ("loop_allocating", "resource_limit"),
    ("loop_forever", "load_timeout"),
]


@pytest.fixture(scope="module")
def v1_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store and folder left by an agent that installed v1 and stopped."""
    root = tmp_path_factory.mktemp("v1")
    with agent_on(root) as agent:
        V1.drop(root / "watch")
        agent.wait_for(model_status("active", 1), WAIT_S, what="v1 active")
    return root


def copy_of(v1_store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "device"
    shutil.copytree(v1_store, root)
    return root


def test_bombs_from_the_folder_fail_in_quarantine_and_are_not_retried_after_a_restart(
    v1_store: Path, tmp_path: Path
) -> None:
    root = copy_of(v1_store, tmp_path)
    with agent_on(root) as agent:
        agent.wait_for(model_status("active", 1, "restored"), WAIT_S, what="v1 restored")
        for version, (bomb, reason) in enumerate(BOMBS, start=2):
            release(bombs.BOMBS[bomb](), version, bombs.FEATURES, golden=False).drop(root / "watch")
            agent.wait_for(model_status("failed", version, reason), WAIT_S, what=f"{bomb} failed")
            assert agent.process.poll() is None, "the agent died"
            assert infer(agent, TINY_FEATURES)[0] == 200
            assert served_version(agent) == 1
        with urllib.request.urlopen(agent.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        assert 'agent_model_update_failures_total{model="m",reason="resource_limit"} 4.0' in metrics
        assert 'agent_model_update_failures_total{model="m",reason="load_timeout"} 1.0' in metrics
    last = len(BOMBS) + 1
    assert record(root).rolled_back.version == last
    # The last bomb's manifest is still in the folder: a restart must not run it again.
    with agent_on(root) as agent:
        agent.wait_for(model_status("failed", last, "load_timeout"), WAIT_S, what="blocked again")
        assert served_version(agent) == 1
        time.sleep(1.0)
        assert not agent.events("quarantine_done"), "a blocked release was tried again"
        assert infer(agent, TINY_FEATURES)[0] == 200


# --- the crash-loop breaker ----------------------------------------------------------------

V2 = release(mid_bytes(0), 2, MID_FEATURES)


@dataclass(frozen=True)
class KillPoint:
    label: str
    event: Callable[[LogLine], bool]  # SIGKILL the moment the agent logs this
    requests_first: int = 0  # requests v2 serves before the kill
    blamed: bool = True  # whether v2 is held responsible at the next start


KILL_POINTS = [
    # Still in quarantine: the serving process never held v2; it is simply installed again.
    KillPoint("in-quarantine", model_status("loading", 2), blamed=False),
    KillPoint("loading-in-process", lambda line: line.get("event") == "installing_in_process"),
    KillPoint("right-after-the-switch", model_status("active", 2)),
    KillPoint("during-the-first-requests", model_status("active", 2), requests_first=2),
]


def _kill_at(agent: AgentProcess, point: KillPoint, drop_into: Path | None) -> None:
    """SIGKILL the agent at `point` of installing v2 (dropped now, or offered by the folder)."""
    if point.requests_first:
        if drop_into is not None:
            V2.drop(drop_into)
        agent.wait_for(point.event, WAIT_S, what=point.label)
        for _ in range(point.requests_first):
            assert infer(agent, MID_FEATURES)[0] == 200
        agent.process.kill()
    else:
        agent.signal_on(point.event, signal.SIGKILL)
        if drop_into is not None:
            V2.drop(drop_into)
    assert agent.process.wait(WAIT_S) == -signal.SIGKILL


def _crash_logged(agent: AgentProcess, action: str) -> LogLine:
    return agent.wait_for(
        lambda line: line.get("event") == "crashed_during_install" and line.get("action") == action,
        WAIT_S,
        what=f"crashed_during_install ({action})",
    )


@pytest.mark.parametrize("point", KILL_POINTS, ids=[p.label for p in KILL_POINTS])
def test_a_sigkill_while_installing_is_retried_once_after_the_restart_and_serves(
    v1_store: Path, tmp_path: Path, point: KillPoint
) -> None:
    """One crash is not evidence against a release: the restart installs it again."""
    root = copy_of(v1_store, tmp_path)
    with agent_on(root) as agent:
        agent.wait_for(model_status("active", 1, "restored"), WAIT_S, what="v1 restored")
        _kill_at(agent, point, root / "watch")
    if point.blamed:
        assert record(root).installing is not None
    with agent_on(root) as agent:
        if point.blamed:
            crash = _crash_logged(agent, "retry")
            assert (crash["version"], crash["crashes"]) == (2, 1)
        active = agent.wait_for(model_status("active", 2), WAIT_S, what="v2 installed again")
        assert ("retry after one crash" in str(active["message"])) is point.blamed
        assert not [line for line in agent.events("model_status") if line["state"] == "failed"]
        assert infer(agent, MID_FEATURES)[0] == 200
        assert served_version(agent) == 2
    assert record(root).rolled_back is None


@pytest.mark.parametrize(
    "point", [p for p in KILL_POINTS if p.blamed], ids=[p.label for p in KILL_POINTS if p.blamed]
)
def test_a_second_sigkill_installing_the_same_release_blocks_it(
    v1_store: Path, tmp_path: Path, point: KillPoint
) -> None:
    root = copy_of(v1_store, tmp_path)
    with agent_on(root) as agent:
        agent.wait_for(model_status("active", 1, "restored"), WAIT_S, what="v1 restored")
        _kill_at(agent, point, root / "watch")
    with agent_on(root) as agent:
        _crash_logged(agent, "retry")
        _kill_at(agent, point, None)  # the folder offers v2 again: the retry dies too
    assert record(root).installing is not None
    with agent_on(root) as agent:
        crash = _crash_logged(agent, "blocked")
        assert (crash["version"], crash["crashes"]) == (2, 2)
        failed = agent.wait_for(
            model_status("failed", 2, "crashed_during_install"), WAIT_S, what="v2 blamed"
        )
        assert "twice" in str(failed["message"])
        agent.wait_for(model_status("active", 1, "restored"), WAIT_S, what="v1 restored")
        assert served_version(agent) == 1
        assert infer(agent, TINY_FEATURES)[0] == 200
        time.sleep(1.0)  # the folder still offers v2: it must not be loaded again
        assert not agent.events("installing_in_process")
        assert served_version(agent) == 1
        assert record(root).active.version == 1
        assert record(root).rolled_back.reason == "crashed_during_install"


def test_a_sigkill_after_the_trial_requests_keeps_the_new_release(
    v1_store: Path, tmp_path: Path
) -> None:
    root = copy_of(v1_store, tmp_path)
    with agent_on(root) as agent:
        agent.wait_for(model_status("active", 1, "restored"), WAIT_S, what="v1 restored")
        V2.drop(root / "watch")
        agent.wait_for(model_status("active", 2), WAIT_S, what="v2 active")
        for _ in range(CRASH_GUARD_REQUESTS + 1):
            assert infer(agent, MID_FEATURES)[0] == 200
        deadline = time.monotonic() + WAIT_S
        while record(root).installing is not None:  # cleared at the next probation tick
            assert time.monotonic() < deadline, "v2 stayed on trial"
            time.sleep(0.05)
        agent.process.kill()
        agent.process.wait(WAIT_S)
    with agent_on(root) as agent:
        agent.wait_for(model_status("active", 2, "restored"), WAIT_S, what="v2 restored")
        assert not agent.events("crashed_during_install")
        assert infer(agent, MID_FEATURES)[0] == 200

"""The command line, run as a user would: start, send, watch."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient

from simulator import pick_loopback_host
from tests.simulator.conftest import DEVICE, MANIFEST, collect_sdk_garbage
from tests.support.inbox import Inbox, sdk_message

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "simulator"]


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a CLI command in a worker thread (no asyncio subprocess transports left to close)."""
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any], subprocess.Popen[str]]]:
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps(MANIFEST))
    run_dir = tmp_path / "run"
    log_path = tmp_path / "simulator.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *CLI,
                "start",
                "--deployment",
                str(deployment),
                "--host",
                pick_loopback_host(),
                "--run-dir",
                str(run_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        info_file = run_dir / "simulator.json"
        deadline = time.monotonic() + 30
        while not info_file.exists():
            assert process.poll() is None, f"the simulator exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"no start in 30 s: {log_path.read_text()}"
            time.sleep(0.05)
        yield run_dir, json.loads(info_file.read_text()), process
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log_path.read_text()
        assert process.stdout is not None
        process.stdout.close()
        collect_sdk_garbage()


def test_start_prints_connection_details_and_writes_an_env_file(
    running: tuple[Path, dict[str, Any], subprocess.Popen[str]],
) -> None:
    run_dir, info, process = running
    assert process.stdout is not None
    printed = [process.stdout.readline() for _ in range(8)]
    producer_env = info["modules"][f"{DEVICE}/producer"]
    assert f"  EdgeHubConnectionString={producer_env['EdgeHubConnectionString']}\n" in printed
    assert f"  {info['service_connection_string']}\n" in printed
    env = (run_dir / "simulator.env").read_text()
    assert f"IOTHUB_CONNECTION_STRING={info['service_connection_string']}" in env
    assert "PRODUCER_EDGEHUB_CONNECTION_STRING=HostName=" in env
    assert oct((run_dir / "simulator.env").stat().st_mode & 0o777) == "0o600"


async def test_send_delivers_a_file_to_a_module_input(
    running: tuple[Path, dict[str, Any], subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    run_dir, info, _ = running
    for name, value in info["modules"][f"{DEVICE}/consumer"].items():
        monkeypatch.setenv(name, value)
    client = IoTHubModuleClient.create_from_edge_environment()
    try:
        await client.connect()
        received: Inbox[Message] = Inbox()
        client.on_message_received = received.put
        body = tmp_path / "body.json"
        body.write_text('{"inputs": []}')
        sent = await _cli(
            "send", "--run-dir", str(run_dir), "--module", "consumer", "--input", "infer",
            "--file", str(body), "--property", "schema=oip/v2",
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        message = await received.get()
    finally:
        await client.shutdown()
    assert (message.input_name, message.data) == ("infer", b'{"inputs": []}')
    assert message.custom_properties == {"schema": "oip/v2"}
    assert message.content_type == "application/json"


@pytest.fixture
def watcher(
    running: tuple[Path, dict[str, Any], subprocess.Popen[str]],
) -> Iterator[IO[str]]:
    """`watch` running against the simulator; its stdout."""
    process = subprocess.Popen(
        [*CLI, "watch", "--run-dir", str(running[0])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    try:
        yield process.stdout
    finally:
        # Also ends a read still waiting for a line in a worker thread.
        process.terminate()
        process.wait(10)
        process.stdout.close()


async def test_watch_follows_upstream_messages_and_reported_changes(
    running: tuple[Path, dict[str, Any], subprocess.Popen[str]],
    watcher: IO[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, info, _ = running
    for name, value in info["modules"][f"{DEVICE}/consumer"].items():
        monkeypatch.setenv(name, value)
    client = IoTHubModuleClient.create_from_edge_environment()
    try:
        hello = json.loads(await asyncio.wait_for(asyncio.to_thread(watcher.readline), 20))
        assert hello == {"kind": "watching", "kinds": ["reported", "upstream"]}
        await client.connect()
        await client.patch_twin_reported_properties({"state": "active"})
        await client.send_message_to_output(sdk_message('{"p": 1}'), "predictions")
        lines = await asyncio.wait_for(
            asyncio.to_thread(lambda: [watcher.readline() for _ in range(2)]), 10
        )
        first, second = (json.loads(line) for line in lines)
    finally:
        await client.shutdown()
    assert (first["kind"], first["data"]["patch"]) == ("reported", {"state": "active"})
    assert (second["kind"], second["data"]["output"], second["data"]["body"]) == (
        "upstream",
        "predictions",
        '{"p": 1}',
    )


def test_start_with_a_broken_manifest_fails_with_a_message(tmp_path: Path) -> None:
    deployment = tmp_path / "deployment.json"
    deployment.write_text("{}")
    result = subprocess.run(
        [*CLI, "start", "--deployment", str(deployment), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "modulesContent" in result.stderr


async def test_fault_drop_cuts_a_connected_module(
    running: tuple[Path, dict[str, Any], subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir, info, _ = running
    for name, value in info["modules"][f"{DEVICE}/producer"].items():
        monkeypatch.setenv(name, value)
    client = IoTHubModuleClient.create_from_edge_environment(connection_retry=False)
    states: Inbox[bool] = Inbox()
    try:
        await client.connect()
        # The SDK annotates this handler as taking None; it is called with no arguments.
        client.on_connection_state_change = lambda: states.put(client.connected)  # type: ignore[assignment]
        fault = await _cli("fault", "drop", "--run-dir", str(run_dir), "--module", "producer")
        assert fault.returncode == 0, fault.stderr
        assert json.loads(fault.stdout) == {"dropped": True}
        assert await states.get() is False
    finally:
        await client.shutdown()

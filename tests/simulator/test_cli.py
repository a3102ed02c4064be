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
from typing import Any

import pytest
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubModuleClient

from simulator import pick_loopback_host
from tests.simulator.conftest import DEVICE, MANIFEST, collect_sdk_garbage
from tests.simulator.inbox import Inbox, sdk_message

CLI = [sys.executable, "-m", "simulator"]


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
        sent = await asyncio.create_subprocess_exec(
            *CLI,
            "send",
            "--run-dir",
            str(run_dir),
            "--module",
            "consumer",
            "--input",
            "infer",
            "--file",
            str(body),
            "--property",
            "schema=oip/v2",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await sent.wait() == 0
        message = await received.get()
    finally:
        await client.shutdown()
    assert (message.input_name, message.data) == ("infer", b'{"inputs": []}')
    assert message.custom_properties == {"schema": "oip/v2"}
    assert message.content_type == "application/json"


async def test_watch_follows_upstream_messages_and_reported_changes(
    running: tuple[Path, dict[str, Any], subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir, info, _ = running
    watcher = await asyncio.create_subprocess_exec(
        *CLI,
        "watch",
        "--run-dir",
        str(run_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for name, value in info["modules"][f"{DEVICE}/consumer"].items():
        monkeypatch.setenv(name, value)
    client = IoTHubModuleClient.create_from_edge_environment()
    try:
        assert watcher.stdout is not None
        async with asyncio.timeout(20):
            hello = json.loads(await watcher.stdout.readline())
        assert hello == {"kind": "watching", "kinds": ["reported", "upstream"]}
        await client.connect()
        await client.patch_twin_reported_properties({"state": "active"})
        await client.send_message_to_output(sdk_message('{"p": 1}'), "predictions")
        async with asyncio.timeout(10):
            first = json.loads(await watcher.stdout.readline())
            second = json.loads(await watcher.stdout.readline())
    finally:
        await client.shutdown()
        watcher.terminate()
        await watcher.wait()
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
        fault = await asyncio.create_subprocess_exec(
            *CLI,
            "fault",
            "drop",
            "--run-dir",
            str(run_dir),
            "--module",
            "producer",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        output, _ = await fault.communicate()
        assert fault.returncode == 0
        assert json.loads(output) == {"dropped": True}
        assert await states.get() is False
    finally:
        await client.shutdown()

"""The fleet on the command line: `start --devices / --fleet`, and `watch` filters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from simulator import HubEvent, pick_loopback_host
from simulator.__main__ import load_fleet
from simulator.rest import event_selected
from tests.simulator.conftest import MANIFEST
from tests.support.azurite import azurite_binary_or_skip


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ("{}", "'devices' must map"),
        ('{"devices": {}}', "'devices' must map"),
        ('{"devices": []}', "'devices' must map"),
        ('{"devices": {"a": {"tags": 3}}}', "needs an object 'tags'"),
        ('{"devices": {"a": 3}}', "needs an object 'tags'"),
        ("not json", "cannot read"),
    ],
)
def test_bad_fleet_files_are_refused(tmp_path: Path, document: str, error: str) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(document)
    with pytest.raises((ValueError, TypeError), match=error):
        load_fleet(path)


def test_a_fleet_file_maps_devices_to_tags(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text('{"devices": {"a": {"tags": {"ring": "canary"}}, "b": {}}}')
    assert load_fleet(path) == {"a": {"ring": "canary"}, "b": {}}


@pytest.mark.parametrize(
    ("event", "devices", "modules", "shown"),
    [
        (HubEvent("desired", "d1", "m1"), set(), set(), True),
        (HubEvent("desired", "d1", "m1"), {"d1"}, set(), True),
        (HubEvent("desired", "d2", "m1"), {"d1"}, set(), False),
        (HubEvent("desired", "d1", "m2"), set(), {"m1"}, False),
        (HubEvent("configuration", "", "", {"id": "c"}), {"d1"}, {"m1"}, True),
        (HubEvent("targeting", "d1", ""), {"d1"}, {"m1"}, True),
        (HubEvent("targeting", "d2", ""), {"d1"}, set(), False),
        (HubEvent("connected", "d1", "m1"), set(), set(), False),  # kind not asked for
    ],
)
def test_watch_filters_by_kind_device_and_module(
    event: HubEvent, devices: set[str], modules: set[str], shown: bool
) -> None:
    kinds = {"desired", "configuration", "targeting"}
    assert event_selected(event, kinds, devices, modules) is shown


def _start(command: list[str], run_dir: Path) -> tuple[dict[str, Any], str]:
    """Run `start` until it has written simulator.json; (that file, what it printed)."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        try:
            info_file = run_dir / "simulator.json"
            deadline = time.monotonic() + 30
            while not info_file.exists():
                assert process.poll() is None, "the simulator exited"
                assert time.monotonic() < deadline, "no start in 30 s"
                time.sleep(0.05)
            info: dict[str, Any] = json.loads(info_file.read_text())
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        assert process.stdout is not None
        return info, process.stdout.read()


@pytest.mark.e2e
def test_start_with_azurite_routes_to_a_container(tmp_path: Path) -> None:
    azurite_binary_or_skip()
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps(MANIFEST))
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "simulator", "start", "--deployment", str(deployment),
        "--devices", "3", "--storage-container", "telemetry", "--azurite",
        "--host", pick_loopback_host(), "--run-dir", str(run_dir),
    ]  # fmt: skip
    info, printed = _start(command, run_dir)
    [storage] = info["storage"]
    assert storage["container"] == "telemetry"
    assert "AccountName=devstoreaccount1" in storage["connection_string"]
    assert "storage route into container 'telemetry'" in printed
    assert sorted({key.split("/")[0] for key in info["modules"]}) == [
        "edge-device-0000", "edge-device-0001", "edge-device-0002"
    ]  # fmt: skip


@pytest.mark.e2e
def test_start_with_a_fleet_file_registers_every_device(tmp_path: Path) -> None:
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps(MANIFEST))
    fleet = tmp_path / "fleet.json"
    devices = {f"site-{n}": {"tags": {"ring": "canary" if n < 2 else "broad"}} for n in range(5)}
    fleet.write_text(json.dumps({"devices": devices}))
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "simulator", "start", "--deployment", str(deployment),
        "--fleet", str(fleet), "--host", pick_loopback_host(), "--run-dir", str(run_dir),
    ]  # fmt: skip
    info, printed = _start(command, run_dir)
    assert sorted(info["modules"]) == sorted(
        f"{device}/{module}" for device in devices for module in ("producer", "consumer")
    )
    assert "5 devices; every module in simulator.json" in printed
    assert "module site-3/" not in printed

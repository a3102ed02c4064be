"""`make demo` is the README's first command: it runs here as a process, as a user runs it, and
its summary is checked. The demo's own exit status says whether the loop closed; the summary's
JSON line says how, so a failure names the step that did not close.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.azurite import azurite_binary_or_skip

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SUMMARY = "DEMO_SUMMARY "


def _summary(stdout: str, stderr: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY)]
    assert lines, f"no summary line; the demo printed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    parsed: dict[str, Any] = json.loads(lines[-1].removeprefix(SUMMARY))
    return parsed


@pytest.mark.timeout(900)
def test_make_demo_closes_the_loop(tmp_path: Path) -> None:
    azurite_binary_or_skip()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo", "--run-dir", str(tmp_path / "demo")],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = demo.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the demo then stops the agents, the hub and Azurite it started.
        demo.terminate()
        stdout, stderr = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)
    done = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    result = _summary(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]

    # v3, the retrained model, on every device of both rings and behind both ring aliases.
    retraining = result["retraining"]
    assert retraining["trigger"] == "drift"
    assert retraining["stage"] == "released"
    assert retraining["version"] == 3
    assert retraining["gate"]["reason"] == "better"
    assert retraining["gate"]["candidate_window"] > retraining["gate"]["champion_window"]
    assert set(result["rings"]) == {"canary", "all"}
    assert result["rings"]["canary"] == {"alias": 3, "devices": {"plant-1": 3}}
    assert result["rings"]["all"] == {
        "alias": 3,
        "devices": {"plant-1": 3, "plant-2": 3, "plant-3": 3},
    }
    for versions in result["swaps"].values():
        assert versions == ["v1", "v2", "v3"]

    # Every reading answered, none failed, across both hot swaps.
    messages = result["messages"]
    assert messages["sent"] > 0
    assert messages["answered"] == messages["sent"]
    assert (messages["lost"], messages["failed"]) == (0, 0)
    assert {"1", "2", "3"} <= set(messages["by_version"])

    # The devices saw the drift themselves, on at least two of the three.
    drifting = {e["device"] for e in result["drift_events"] if e["state"] == "drift"}
    assert len(drifting) >= 2

    # What the summary points at exists.
    run = tmp_path / "demo"
    assert (run / "mlflow.db").is_file()
    assert (run / "audit.jsonl").is_file()
    assert list((run / "drift-report").glob("*.html"))
    assert "mlflow ui --backend-store-uri" in done.stdout
    assert "/metrics" in done.stdout

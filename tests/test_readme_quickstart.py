"""The README's quickstart, run as a user runs it: its Python block saved as `train.py` and run,
then its shell block in a fresh folder (a real scikit-learn model, the agent serving the file,
the baseline, `dev up`, the publisher's commands, a device serving the release, `dev down`)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.azurite import azurite_binary_or_skip

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Quickstart: your own model"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def quickstart_blocks(readme: str) -> dict[str, str]:
    """The quickstart section's code blocks by language (one each)."""
    start = readme.index(SECTION)
    end = readme.index("\n## ", start + len(SECTION))
    blocks = BLOCK.findall(readme[start:end])
    languages = [language for language, _ in blocks]
    assert sorted(languages) == ["python", "sh"], (
        f"expected one python and one sh block: {languages}"
    )
    return dict(blocks)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(600)
def test_the_readme_quickstart_publishes_a_scikit_learn_model_to_the_dev_fleet(
    tmp_path: Path,
) -> None:
    azurite_binary_or_skip()
    blocks = quickstart_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    (tmp_path / "train.py").write_text(blocks["python"], encoding="utf-8")
    # The agent started in the background is stopped whatever line fails.
    script = 'trap \'if [ -n "${SERVER:-}" ]; then kill "$SERVER" 2>/dev/null || true; fi\' EXIT\n'
    (tmp_path / "quickstart.sh").write_text(script + blocks["sh"], encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    environ |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "PORT": str(_free_port()),
        "METRICS_PORT": str(_free_port()),
    }
    run = {"cwd": tmp_path, "env": environ, "capture_output": True, "text": True}
    try:
        trained = subprocess.run(["python", "train.py"], check=False, timeout=120, **run)  # type: ignore[call-overload]
        assert trained.returncode == 0, trained.stderr
        done = subprocess.run(  # type: ignore[call-overload]
            ["bash", "-euo", "pipefail", "quickstart.sh"],
            check=False,
            timeout=480,
            **run,
        )
    finally:
        subprocess.run(
            [sys.executable, "-m", "demo.dev", "down", "--run-dir", str(tmp_path / "run" / "dev")],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    # The file served as is: one class label and the three probabilities, as tensors.
    answer = json.loads(next(line for line in done.stdout.splitlines() if '"model_name"' in line))
    assert [o["name"] for o in answer["outputs"]] == ["label", "probabilities"]
    assert answer["outputs"][1]["shape"] == [1, 3]
    # The canary's agent serves the release the publisher made.
    served = json.loads(next(line for line in done.stdout.splitlines() if '"versions"' in line))
    assert served["name"] == "iris"
    assert served["versions"] == ["1"]
    assert served["parameters"]["status_state"] == "active"
    assert "released iris:1 to canary, all" in done.stdout
    assert "canary: 1/1 active" in done.stderr  # the gate's progress
    assert "stopped (pid" in done.stdout
    assert not (tmp_path / "run" / "dev" / "dev.pid").exists()

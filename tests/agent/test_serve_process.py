"""`python -m agent serve` as a real process: start-up, bad arguments, SIGTERM drain."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from deployment.examples.onnx_models import mid_mlp, save, tiny_mlp
from tests.support.agent_process import running_agent

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_mlp(), tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="module")
def mid_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(mid_mlp(), tmp_path_factory.mktemp("models") / "mid.onnx")


def _infer_body(rows: int, features: int) -> dict[str, object]:
    data = np.random.default_rng(1).standard_normal((rows, features)).astype(np.float32)
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [rows, features],
                "data": data.ravel().tolist(),
            }
        ]
    }


async def _until_in_flight(session: aiohttp.ClientSession, metrics_url: str) -> None:
    """Wait until the agent is inside inference for a request (a loaded machine is slow)."""
    async with asyncio.timeout(60):
        while True:
            async with session.get(metrics_url) as response:
                text = await response.text()
            line = next(
                li for li in text.splitlines() if li.startswith("agent_inference_in_flight")
            )
            if float(line.split()[-1]) >= 1:
                return
            await asyncio.sleep(0.01)


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment | (env or {}),
        check=False,
    )


def test_a_missing_model_file_fails_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    result = _run_cli("serve", "--model", str(missing), "--http-port", "0", "--metrics-port", "0")
    assert result.returncode == 1
    assert str(missing) in result.stderr


def test_a_file_that_is_not_onnx_fails_to_load(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    result = _run_cli(
        "serve", "--model", str(bogus), "--host", "127.0.0.1", "--http-port", "0",
        "--metrics-port", "0",
    )  # fmt: skip
    assert result.returncode == 1
    assert "ModelLoadError" in result.stderr


def test_a_misspelt_setting_is_refused_by_name(tiny_path: Path) -> None:
    result = _run_cli("serve", "--model", str(tiny_path), env={"EDGEML_MAX_BACTH": "8"})
    assert result.returncode == 2
    assert "EDGEML_MAX_BACTH" in result.stderr


def test_an_out_of_range_port_is_refused(tiny_path: Path) -> None:
    result = _run_cli("serve", "--model", str(tiny_path), "--http-port", "70000")
    assert result.returncode == 2
    assert "http_port" in result.stderr


async def test_sigterm_drains_requests_in_flight_then_exits_zero(mid_path: Path) -> None:
    with running_agent(mid_path, env={"EDGEML_SHUTDOWN_GRACE_S": "5"}) as agent:
        url = f"{agent.http_url}/v2/models/mid/infer"
        # ~30 ms each to decode and run: the agent still holds work when SIGTERM lands.
        body = json.dumps(_infer_body(64, 1024)).encode()
        headers = {"Content-Type": "application/json"}
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:

            async def one() -> tuple[int, float]:
                payload = io.BytesIO(body)  # aiohttp warns on large raw bytes bodies
                async with session.post(url, data=payload, headers=headers) as response:
                    await response.read()
                    return response.status, loop.time()

            assert (await one())[0] == 200
            in_flight = [asyncio.ensure_future(one()) for _ in range(24)]
            await _until_in_flight(session, agent.metrics_url)
            agent.process.send_signal(signal.SIGTERM)
            signalled = loop.time()
            results = await asyncio.gather(*in_flight, return_exceptions=True)
        exit_code = await asyncio.to_thread(agent.process.wait, 15)
    assert exit_code == 0
    answered = [r for r in results if isinstance(r, tuple)]
    assert all(status == 200 for status, _ in answered), results
    assert any(done > signalled for _, done in answered), (signalled, results)
    # Requests not yet accepted when intake stopped see a closed connection, never a 5xx.
    refused = [r for r in results if not isinstance(r, tuple)]
    assert all(isinstance(r, aiohttp.ClientConnectionError) for r in refused), refused
    assert agent.events("process_stopped")[0]["reason"] == "SIGTERM"

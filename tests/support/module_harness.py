"""End-to-end harness: the module as its own process, the service SDK, a sensor module, and the
HTTPS artifact server on a thread of its own.

The tests are synchronous on purpose: the service SDK (requests) and the simulator's calls
block, and a blocking call on the loop that served the artifacts would stall the very
downloads under test. So the artifact server gets a loop and a thread of its own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import psutil
import pytest
from azure.iot.device import IoTHubModuleClient, Message
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msrest.exceptions import HttpOperationError

from agent.releases.manifest import public_key_to_b64, sign_manifest
from deployment.publish.release import build_manifest
from tests.support.artifact_server import Artifact, ArtifactServer, SeenRequest, TestPki
from tests.support.models import TINY_FEATURES, tiny_bytes
from tests.support.polling import poll

T = TypeVar("T")
LogLine = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
MODULE = "mlagent"
SENSOR = "sensor"
KEY_ID = "release-key"


# --- the artifact server on its own thread --------------------------------------------------


class ThreadedArtifacts:
    """`ArtifactServer` (tests/agent) served from a loop on a thread of its own."""

    def __init__(self, pki: TestPki) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="artifacts")
        self._thread.start()
        self.server: ArtifactServer = self._call(self._make(pki))
        self._call(self.server.start())

    @staticmethod
    async def _make(pki: TestPki) -> ArtifactServer:
        return ArtifactServer(pki.good)  # its aiohttp runner belongs to this loop

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(30)

    def add(self, name: str, artifact: Artifact) -> str:
        async def add() -> str:
            return self.server.add(name, artifact)

        return str(self._call(add()))

    def requests_for(self, name: str) -> list[SeenRequest]:
        return [r for r in list(self.server.requests) if r.path == f"/{name}"]

    def close(self) -> None:
        self._call(self.server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --- signed releases --------------------------------------------------------------------------


@functools.cache
def _unsigned(model: bytes, url: str, *, golden: bool, contract_change: bool) -> str:
    """The publisher's work for one model (an ORT session for the golden sample): done once."""
    key = Ed25519PrivateKey.generate()  # thrown away: only the unsigned part is kept
    signed = build_manifest(
        model,
        name="m",
        version=1,
        url=url,
        key=key,
        key_id="x",
        golden_atol=1e-4 if golden else None,
        contract_change=contract_change,
    )
    del signed["signature"]
    return json.dumps(signed)


@dataclass
class Releases:
    """Publishes model bytes on the artifact server and signs manifests for them."""

    artifacts: ThreadedArtifacts
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def trusted_keys(self) -> str:
        return f"{KEY_ID}={public_key_to_b64(self.key.public_key())}"

    def serve(self, file_name: str, model: bytes, **faults: Any) -> str:
        return self.artifacts.add(file_name, Artifact(model, **faults))

    def manifest(
        self,
        model: bytes,
        version: int,
        url: str,
        *,
        golden: bool = True,
        contract_change: bool = False,
    ) -> dict[str, Any]:
        unsigned = json.loads(_unsigned(model, url, golden=golden, contract_change=contract_change))
        unsigned["version"] = version
        return sign_manifest(unsigned, self.key, KEY_ID)

    def release(self, file_name: str, model: bytes, version: int, **kwargs: Any) -> dict[str, Any]:
        """Serve `model` as `file_name` and sign a manifest of `version` for it."""
        return self.manifest(model, version, self.serve(file_name, model), **kwargs)


# --- the module process ---------------------------------------------------------------------


@dataclass
class ModuleProcess:
    """`python -m module` with JSON logs read on a thread (its stdout and stderr, merged)."""

    process: subprocess.Popen[str]
    lines: list[LogLine] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # the same lines, as written
    ports: dict[str, int] = field(default_factory=dict)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, env: Mapping[str, str], log_file: Path) -> ModuleProcess:
        process = subprocess.Popen(
            [sys.executable, "-m", "module"],
            cwd=REPO,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        module = cls(process)
        module._reader = threading.Thread(
            target=module._read, args=(log_file,), name="module-log", daemon=True
        )
        module._reader.start()
        return module

    def _read(self, log_file: Path) -> None:
        assert self.process.stdout is not None
        with log_file.open("a") as copy:
            for raw in self.process.stdout:
                copy.write(raw)
                copy.flush()
                self.raw.append(raw)
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    line = {"event": "unparsed", "text": raw.rstrip()}
                if not isinstance(line, dict):
                    line = {"event": "unparsed", "text": raw.rstrip()}
                if line.get("event") == "http_listening":
                    self.ports[str(line["service"])] = int(line["port"])
                self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def events(self, name: str) -> list[LogLine]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_for(self, matches: Callable[[LogLine], bool], timeout: float, what: str) -> LogLine:
        def found() -> LogLine | None:
            hits = [line for line in list(self.lines) if matches(line)]
            if hits:
                return hits[0]
            if self.process.poll() is not None:
                pytest.fail(f"the module exited ({self.process.returncode}) before {what}")
            return None

        return poll(found, timeout, f"module log: {what}", interval=0.05)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda line: line.get("event") == "hub_connection", timeout, "connected")
        poll(lambda: "http" in self.ports, timeout, "HTTP port logged")

    def infer_http(self, name: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['http']}/v2/models/{name}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), json.loads(error.read())

    def metadata(self, name: str) -> Any:
        url = f"http://127.0.0.1:{self.ports['http']}/v2/models/{name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample from the module's `/metrics` (None if absent)."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        wanted = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in (labels or {}).items()) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def terminate(self, timeout: float = 15.0, *, fail: bool = True) -> int | None:
        """SIGTERM, then the exit code. If it does not exit in time: SIGKILL, and a test
        failure (or None with `fail=False`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            if self._reader is not None:
                self._reader.join(10)  # every line it wrote is read: the caller looks at them
            if fail:
                pytest.fail(f"the module did not exit within {timeout} s of SIGTERM")
            return None

    def close(self) -> None:
        """SIGKILL if still running; then the log reader ends and the pipe is closed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def module_environment(
    edge_env: Mapping[str, str],
    *,
    state_dir: Path,
    trusted_keys: str,
    artifact_ca: Path,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEML_")}
    env.update(edge_env)
    env.update(
        {
            "EDGEML_STATE_DIR": str(state_dir),
            "EDGEML_TRUSTED_KEYS": trusted_keys,
            "EDGEML_ALLOWED_HOSTS": "127.0.0.1",
            "EDGEML_ARTIFACT_CA_FILE": str(artifact_ca),
            "EDGEML_HOST": "127.0.0.1",
            "EDGEML_HTTP_PORT": "0",
            "EDGEML_METRICS_PORT": "0",
            "EDGEML_LOG_FORMAT": "json",
            **(extra or {}),
        }
    )
    return env


# --- the cloud side through the real service SDK ----------------------------------------------


@dataclass
class Service:
    """The module twin and direct methods through azure-iot-hub, as an operator would."""

    registry: IoTHubRegistryManager
    device: str

    def twin(self) -> Any:
        return self.registry.get_module_twin(self.device, MODULE)

    def reported(self) -> dict[str, Any]:
        return dict(self.twin().properties.reported or {})

    def desired_version(self) -> int:
        return int(self.twin().properties.desired["$version"])

    def update_desired(self, patch: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]) -> int:
        """Patch the desired properties under the twin's etag; the new desired `$version`.

        The etag changes with every reported patch too, so a 412 (the module reported in
        between) is answered as an operator's tool would: read again, patch again.
        `patch` may be a function of the twin read.
        """
        for _ in range(10):
            current = self.twin()
            body = dict(patch(current) if callable(patch) else patch)
            twin = Twin(properties=TwinProperties(desired=body))
            try:
                updated = self.registry.update_module_twin(self.device, MODULE, twin, current.etag)
            except HttpOperationError as error:
                if error.response.status_code != 412:
                    raise
                continue
            return int(updated.properties.desired["$version"])
        pytest.fail("the module twin changed under ten updates in a row")

    def publish(self, manifest: Mapping[str, Any], key: str | None = None) -> int:
        """Desired `models.<key>` := `manifest` (key: its name). A twin update through this
        SDK is a JSON merge patch, so a field of the previous manifest that this one lacks
        (`golden`, `expires`) is sent as null: merged into the new one, it would break the
        signature. (A layered deployment that owns `models.<key>` replaces it wholesale.)"""
        key = key or str(manifest["name"])

        def patch(twin: Any) -> dict[str, Any]:
            previous = (twin.properties.desired.get("models") or {}).get(key)
            model = dict(manifest)
            if isinstance(previous, Mapping):
                model.update({field: None for field in previous if field not in manifest})
            return {"models": {key: model}}

        return self.update_desired(patch)

    def wait_reported(
        self, matches: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            reported = self.reported()
            return reported if matches(reported) else None

        return poll(check, timeout, f"reported: {what}", interval=0.15)

    def wait_model(
        self, version: int, state: str = "active", timeout: float = 30.0, name: str = "m"
    ) -> dict[str, Any]:
        """The reported `models.<name>` entry once it shows `version` in `state`."""
        reported = self.wait_reported(
            lambda r: (
                model_entry(r, name).get("version") == version
                and model_entry(r, name).get("state") == state
            ),
            timeout,
            f"model {name} version {version} {state}",
        )
        return model_entry(reported, name)

    def invoke(self, method: str, payload: Any = None, timeout: int = 15) -> tuple[int, Any]:
        request = CloudToDeviceMethod(
            method_name=method, payload=payload, response_timeout_in_seconds=timeout
        )
        result = self.registry.invoke_device_module_method(self.device, MODULE, request)
        return int(result.status), result.payload


def model_entry(reported: Mapping[str, Any], name: str = "m") -> dict[str, Any]:
    """The reported `models.<name>` entry ({} if absent)."""
    models = reported.get("models") or {}
    return dict(models.get(name) or {})


# --- a sensor module: a real device SDK client sending infer requests -------------------------


@contextmanager
def sensor_client(connection_string: str, ca_cert: Path) -> Iterator[IoTHubModuleClient]:
    client = IoTHubModuleClient.create_from_connection_string(
        connection_string, server_verification_cert=ca_cert.read_text()
    )
    client.connect()
    try:
        yield client
    finally:
        client.shutdown()


def infer_request(request_id: str, rows: np.ndarray) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ],
    }


def send_infer(client: IoTHubModuleClient, correlation_id: str, rows: np.ndarray) -> None:
    message = Message(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        json.dumps(infer_request(correlation_id, rows)),
        message_id=f"msg-{correlation_id}",
        content_encoding="utf-8",
        content_type="application/json",
    )
    message.correlation_id = correlation_id
    client.send_message_to_output(message, "samples")


@functools.cache
def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def reference(model: bytes, rows: np.ndarray) -> np.ndarray:
    """What ONNX Runtime itself computes for `rows` (the module's answers must agree)."""
    session = _session(model)
    output = session.run(None, {session.get_inputs()[0].name: rows})[0]
    return np.asarray(output)


# --- what the end-to-end tests share ---------------------------------------------------------

V1, V2 = tiny_bytes(0), tiny_bytes(1)


def tiny_rows(seed: int) -> np.ndarray:
    """One seeded row for the tiny model."""
    return np.random.default_rng(seed).standard_normal((1, TINY_FEATURES)).astype(np.float32)


def publish_v1(service: Service, releases: Releases) -> dict[str, Any]:
    """Release v1 of the tiny model and wait until the module serves it."""
    manifest = releases.release("v1.onnx", V1, 1)
    service.publish(manifest)
    service.wait_model(1)
    return manifest


def log_time(line: Mapping[str, Any]) -> float:
    """A JSON log line's timestamp, in seconds since the epoch."""
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()

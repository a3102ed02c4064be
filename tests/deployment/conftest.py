"""Fixtures of the publisher tests: a workspace with a config file, one MLflow database per
session (creating its tables takes seconds), and the CLI run in-process or as a process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deployment import cli
from deployment.examples.onnx_models import save, tiny_mlp
from deployment.publish.publisher import HubFactory, _azure_hub
from deployment.publish.registry import Registry
from tests.support.azurite import azurite  # noqa: F401  (a fixture: pytest finds it by name)

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@dataclass
class Workspace:
    root: Path
    mlflow_db: Path
    environ: dict[str, str] = field(default_factory=dict)
    rings: Mapping[str, str] = field(default_factory=dict)
    extra: str = ""
    lab: bool = True  # Azurite serves plain http: only a lab signs such URLs

    @property
    def config(self) -> Path:
        return self.root / "edgeml.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    def write_config(self) -> None:
        rings = "".join(f'{name} = "{cond}"\n' for name, cond in self.rings.items())
        self.config.write_text(
            "[environments.test]\n"
            f'mlflow_tracking_uri = "sqlite:///{self.mlflow_db}"\n'
            'audit_log = "audit.jsonl"\n'
            'storage_container = "models"\n'
            f"lab = {str(self.lab).lower()}\n"
            f"{self.extra}"
            "[environments.test.rings]\n"
            f"{rings}"
        )

    def cli(self, *args: str, hub_factory: HubFactory = _azure_hub) -> Result:
        """The CLI in this process (fast); the environment is this workspace's only."""
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(
            ["--config", str(self.config), *args],
            environ=self.environ,
            stdout=out,
            stderr=err,
            hub_factory=hub_factory,
            logs=False,
        )
        return Result(code, out.getvalue(), err.getvalue())

    def process(self, *args: str, timeout: float = 600) -> Result:
        """`python -m deployment` as its own process, as CI would run it."""
        environ = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.root),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
            **self.environ,
        }
        done = subprocess.run(
            [sys.executable, "-m", "deployment", "--config", str(self.config), *args],
            env=environ,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def register(self, model: Path, name: str, *extra: str) -> int:
        """`register` with the workspace's metrics file; the version it registered."""
        result = self.cli(
            "register", str(model), "--name", name, "--metrics", str(self.metrics), *extra
        )
        assert result.code == 0, result.err
        return int(result.out.split(f"registered {name}:")[1].split()[0])

    def publish(self, model: Path, name: str) -> int:
        """register, upload, sign: the version, ready to release."""
        version = self.register(model, name)
        for command in ("upload", "sign"):
            result = self.cli(command, f"{name}:{version}")
            assert result.code == 0, result.err
        return version

    def keygen(self) -> Path:
        result = self.cli("keygen", "--out", str(self.root / "keys"))
        assert result.code == 0, result.err
        keys = sorted((self.root / "keys").glob("*.key"), key=lambda p: p.stat().st_mtime_ns)
        return keys[-1]


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Created up front: reads refuse a missing database, and any test may read first."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    Registry.connect(f"sqlite:///{path}", create=True)
    return path


@pytest.fixture
def workspace(tmp_path: Path, mlflow_db: Path) -> Workspace:
    ws = Workspace(tmp_path, mlflow_db, rings={"canary": "tags.ring = 'canary'"})
    ws.write_config()
    key = ws.keygen()
    ws.environ["PUBLISHER_SIGNING_KEY_FILE"] = str(key)
    ws.environ["PUBLISHER_ACTOR"] = "tester"
    ws.metrics.write_text('{"accuracy": 0.91, "loss": 0.2}')
    return ws


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_mlp(seed=1), tmp_path_factory.mktemp("models") / "tiny.onnx")

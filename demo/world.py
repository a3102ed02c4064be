"""The demo's world, all on loopback: Azurite over HTTPS, the simulated hub with a small fleet in
two rings, the publisher's environment (edgeml.toml, secrets from files and variables) and one
real `python -m module` agent process per device.

Azurite serves HTTPS with a certificate from a throw-away CA of its own (`simulator.certs`),
because agents download only over HTTPS from allow-listed hosts: each agent gets that CA as
EDGEML_ARTIFACT_CA_FILE. In-process clients (the publisher's Blob client, the simulator's
storage route) trust it through REQUESTS_CA_BUNDLE, a bundle of both CAs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo.container import ModuleContainer, start_module_container
from deployment import config as publisher_config
from deployment.image.docker import Docker
from deployment.publish import signing
from simulator import certs
from simulator.azurite import Azurite
from simulator.hub import Simulator, pick_loopback_host
from simulator.storage import StorageRoute

TEMPLATE = Path(__file__).resolve().parent.parent / "deployment" / "deployment.template.json"
AGENT, SENSOR = "mlagent", "sensor"
MODEL = "sensor_classifier"
# Device id -> twin tags: one canary, and `all` is every device of the fleet.
FLEET: dict[str, dict[str, str]] = {
    "plant-1": {"ring": "canary", "fleet": "edgeml"},
    "plant-2": {"ring": "broad", "fleet": "edgeml"},
    "plant-3": {"ring": "broad", "fleet": "edgeml"},
}
RINGS = {"canary": "tags.ring = 'canary'", "all": "tags.fleet = 'edgeml'"}
PROFILES_CONTAINER = "drift-profiles"
MAX_LATENCY_RATIO = 10.0  # the probation's and the publisher gate's, for the demo (below)
PROFILE_SCHEMA = "agent-drift-profile/1"
# The device's drift watch, as the base deployment sets it for the demo: windows of 50 sampled
# rows (a calibrated size of the baseline pack) or 10 s, every request sampled.
DRIFT = {"window_rows": 50, "window_seconds": 10.0, "max_sampled_per_second": 1000.0}
# Probation short enough for a demo: 40 requests or 4 s, judged after 10 requests. The p99 of
# 40 sub-millisecond requests is their slowest one, which a busy 2-core machine can make several
# times slower than the last model's: latency may grow tenfold before it rolls back.
PROBATION = {
    "EDGEML_PROBATION_REQUESTS": "40",
    "EDGEML_PROBATION_SECONDS": "4",
    "EDGEML_PROBATION_MIN_REQUESTS": "10",
    "EDGEML_PROBATION_MAX_LATENCY_RATIO": str(MAX_LATENCY_RATIO),
}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (bound to 0, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def demo_deployment(template: Path) -> dict[str, Any]:
    """The base deployment with the demo's drift section in the agent's desired properties."""
    deployment: dict[str, Any] = json.loads(template.read_text(encoding="utf-8"))
    desired = deployment["modulesContent"][AGENT]["properties.desired"]
    desired["drift"] = dict(DRIFT)
    return deployment


@dataclass
class Agent:
    device: str
    http_port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    container: ModuleContainer | None = None  # --container: the agent runs from the image

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class World:
    run_dir: Path
    azurite: Azurite
    sim: Simulator
    config_path: Path
    environ: dict[str, str]
    trusted_keys: str
    azurite_ca: Path
    agents: dict[str, Agent] = field(default_factory=dict)

    @property
    def mlflow_db(self) -> Path:
        return self.run_dir / "mlflow.db"

    def agent_env(self, device: str, agent: Agent) -> dict[str, str]:
        return {
            **self.sim.edge_env(device, AGENT),
            "EDGEML_TRUSTED_KEYS": self.trusted_keys,
            "EDGEML_ALLOWED_HOSTS": self.azurite.host,
            "EDGEML_ARTIFACT_CA_FILE": str(self.azurite_ca),
            "EDGEML_HOST": "127.0.0.1",
            "EDGEML_HTTP_PORT": str(agent.http_port),
            "EDGEML_METRICS_PORT": str(agent.metrics_port),
            "EDGEML_LOG_FORMAT": "json",
            **PROBATION,
        }

    def start_agent(self, device: str) -> Agent:
        agent = Agent(
            device,
            free_port(),
            free_port(),
            self.run_dir / "devices" / device / "module.log",
        )
        agent.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEML_")}
        env |= self.agent_env(device, agent)
        env["EDGEML_STATE_DIR"] = str(agent.log_path.parent / "state")
        with agent.log_path.open("wb") as log:
            agent.process = subprocess.Popen(
                [sys.executable, "-m", "module"], env=env, stdout=log, stderr=log
            )
        self.agents[device] = agent
        return agent

    def start_agent_container(self, device: str, docker: Docker, image: str) -> Agent:
        """The agent of `device` from the device image, as iotedgehubdev runs a module: the
        CA files mounted, the model store on the image's volume, the host's network."""
        agent = Agent(
            device, free_port(), free_port(), self.run_dir / "devices" / device / "module.log"
        )
        agent.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.agent_env(device, agent)
        ca_files = {
            name: Path(env.pop(name))
            for name in ("EdgeModuleCACertificateFile", "EDGEML_ARTIFACT_CA_FILE")
        }
        agent.container = start_module_container(
            docker, image, env, ca_files, agent.log_path.parent
        )
        self.agents[device] = agent
        return agent

    def reported(self, device: str) -> Mapping[str, Any]:
        """The agent's reported entry of the demo's model on `device` ({} before any)."""
        reported = self.sim.twin(device, AGENT)["properties"].get("reported") or {}
        models = reported.get("models") or {}
        entry = models.get(MODEL) if isinstance(models, Mapping) else None
        return entry if isinstance(entry, Mapping) else {}

    def stop(self) -> None:
        """Every agent (SIGTERM, then SIGKILL), the hub and Azurite; safe to call twice."""
        for agent in self.agents.values():
            if agent.container is not None:
                with contextlib.suppress(Exception):
                    agent.container.stop()
                agent.container.remove()
            process = agent.process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        with contextlib.suppress(RuntimeError):
            self.sim.stop()
        self.azurite.stop()


def start_world(run_dir: Path, environment: str = "simulator") -> World:
    """Azurite (HTTPS), the hub with the fleet, the publisher's config (its environment named
    ``environment``) and key; no agents yet."""
    host = pick_loopback_host()
    storage_certs = certs.generate(run_dir / "azurite-certs", host)
    bundle = run_dir / "ca-bundle.pem"
    bundle.write_bytes(storage_certs.ca_cert.read_bytes())
    # Read per request by requests (under the Azure SDKs): the storage route and the publisher.
    os.environ["REQUESTS_CA_BUNDLE"] = str(bundle)
    azurite = Azurite.start(
        run_dir / "azurite", host=host, tls=(storage_certs.server_cert, storage_certs.server_key)
    )
    try:
        route = StorageRoute(
            name="driftProfiles",
            connection_string=azurite.connection_string,
            container=PROFILES_CONTAINER,
            condition=f"schema = '{PROFILE_SCHEMA}'",
            batch_frequency_seconds=5.0,
        )
        sim = Simulator.start(
            demo_deployment(TEMPLATE),
            run_dir=run_dir / "sim",
            host=host,
            devices=FLEET,
            storage_routes=[route],
        )
    except BaseException:
        azurite.stop()
        raise
    with bundle.open("ab") as handle:
        handle.write(sim.ca_cert_path.read_bytes())
    key = signing.generate(run_dir / "keys")
    secrets_dir = run_dir / "secrets"
    secrets_dir.mkdir(mode=0o700)
    # A secret from a file in the environment's secrets_dir, the others from variables.
    (secrets_dir / publisher_config.SIGNING_KEY_SECRET.lower()).write_bytes(
        key.private_file.read_bytes()
    )
    (secrets_dir / publisher_config.SIGNING_KEY_SECRET.lower()).chmod(0o600)
    config_path = run_dir / "edgeml.toml"
    rings = "\n".join(f'{name} = "{condition}"' for name, condition in RINGS.items())
    config_path.write_text(
        f"""# The demo's publisher environment: endpoints only; secrets come from the environment
# (IOTHUB_CONNECTION_STRING, AZURE_STORAGE_CONNECTION_STRING) and secrets/.
[environments.{environment}]
hub = "{sim.service_hostname}"
mlflow_tracking_uri = "sqlite:///mlflow.db"
storage_container = "models"
audit_log = "audit.jsonl"
module = "{AGENT}"
sas_hours = 24
secrets_dir = "secrets"
lab = true
hub_ca_file = "{sim.ca_cert_path.resolve()}"

[environments.{environment}.rings]
{rings}
""",
        encoding="utf-8",
    )
    environ = dict(os.environ) | {
        publisher_config.HUB_SECRET: sim.service_connection_string,
        publisher_config.STORAGE_SECRET: azurite.connection_string,
        publisher_config.CONFIG_VARIABLE: str(config_path),
        publisher_config.ENVIRONMENT_VARIABLE: environment,
    }
    return World(
        run_dir=run_dir,
        azurite=azurite,
        sim=sim,
        config_path=config_path,
        environ=environ,
        trusted_keys=key.trusted_keys_entry,
        azurite_ca=storage_certs.ca_cert,
    )

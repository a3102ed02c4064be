"""The monitoring path on loopback: agent-mode Prometheus per device, a central Prometheus with the
committed rules, Alertmanager with the committed routing, and a webhook receiver.

Each config is the committed file with only what must differ on this machine replaced (targets,
URLs, ports, and intervals shortened so a test takes seconds); every replacement is listed here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.monitoring_files import (
    AGENT_PROMETHEUS,
    ALERTMANAGER,
    CENTRAL_PROMETHEUS,
    RULES,
    load_yaml,
)
from tests.support.prometheus import (
    Prometheus,
    Service,
    debian_binary,
    free_port,
    running_prometheus_server,
    running_service,
)

HUB = "hub-test.azure-devices.net"
SCRAPE_INTERVAL = "2s"
# One remote-write request per scrape, as with the committed 5 s deadline and 60 s interval.
BATCH_SEND_DEADLINE = "1s"
# Well over the spread between two devices' alerts here (a few seconds on a loaded machine),
# and under the committed 30 s so the test stays short.
GROUP_WAIT_S = 15
GROUP_WAIT = f"{GROUP_WAIT_S}s"


@dataclass
class Webhook:
    """Alertmanager's webhook receiver: records each notification (path and JSON body)."""

    url: str
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def notifications(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return list(self.received)


@contextmanager
def running_webhook() -> Iterator[Webhook]:
    webhook = Webhook("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with webhook.lock:
                webhook.received.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    webhook.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield webhook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def alertmanager_config(webhook: str) -> dict[str, Any]:
    """The committed routing; receivers post to `webhook`/<receiver>; a shorter group_wait."""
    config: dict[str, Any] = load_yaml(ALERTMANAGER)
    config["route"]["group_wait"] = GROUP_WAIT
    for route in config["route"]["routes"]:
        route.pop("group_wait", None)
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook}/{receiver['name']}"
    return config


def central_config(alertmanager: str) -> dict[str, Any]:
    """The committed central config: the committed rules, evaluated every second."""
    config: dict[str, Any] = load_yaml(CENTRAL_PROMETHEUS)
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(RULES)]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
    return config


def agent_config(target: str, remote_write_url: str, token_file: Path) -> dict[str, Any]:
    """The committed on-device config scraping `target`, writing to `remote_write_url`."""
    config: dict[str, Any] = load_yaml(AGENT_PROMETHEUS)
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["global"]["scrape_timeout"] = SCRAPE_INTERVAL
    (scrape,) = config["scrape_configs"]
    (static,) = scrape["static_configs"]
    static["targets"] = [target]
    (remote,) = config["remote_write"]
    remote["url"] = remote_write_url
    remote["authorization"]["credentials_file"] = str(token_file)
    remote["queue_config"]["batch_send_deadline"] = BATCH_SEND_DEADLINE
    return config


def write_config(workdir: Path, name: str, config: Mapping[str, Any]) -> Path:
    path = workdir / name
    path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
    return path


@contextmanager
def running_alertmanager(workdir: Path, webhook: str) -> Iterator[Service]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(workdir, "alertmanager.yml", alertmanager_config(webhook))
    argv = [
        debian_binary("prometheus-alertmanager", "prometheus-alertmanager"),
        f"--config.file={config}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # one instance, no gossip port
        "--log.level=warn",
    ]
    with running_service("alertmanager", argv, workdir, port) as service:
        yield service


@contextmanager
def running_central(workdir: Path, alertmanager: str) -> Iterator[Prometheus]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(workdir, "prometheus.yml", central_config(alertmanager))
    argv = [
        debian_binary("prometheus", "prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-remote-write-receiver",
        "--log.level=warn",
    ]
    with running_prometheus_server("central", argv, workdir, port) as server:
        yield server


@contextmanager
def running_device_prometheus(
    workdir: Path, *, device_id: str, ring: str, target: str, remote_write_url: str
) -> Iterator[Service]:
    """The on-device agent-mode Prometheus, with the variables IoT Edge sets in a module."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token = workdir / "remote-write-token"
    token.write_text("test-token\n")
    config = write_config(workdir, "agent.yml", agent_config(target, remote_write_url, token))
    argv = [
        debian_binary("prometheus", "prometheus"),
        "--enable-feature=agent,expand-external-labels",
        f"--config.file={config}",
        f"--storage.agent.path={workdir / 'wal'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    env = {"IOTEDGE_DEVICEID": device_id, "IOTEDGE_IOTHUBHOSTNAME": HUB, "EDGE_RING": ring}
    with running_service(f"prometheus-{device_id}", argv, workdir, port, env=env) as service:
        yield service

"""A small publisher for tests: signs releases of real models served by the HTTPS test server."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from prometheus_client import CollectorRegistry

from agent.observation.metrics import InferenceMetrics
from agent.releases.download import Downloader, DownloadPolicy
from agent.releases.lifecycle import ModelStatus, ProbationPolicy
from agent.releases.quarantine import Quarantine
from agent.releases.store import ModelStore
from agent.releases.swap import HttpsArtifacts, ModelManager, ReleaseObserver
from agent.serving.inference import InferenceService
from deployment.publish.release import build_manifest
from tests.support.artifact_server import Artifact, ArtifactServer, TestPki

KEY_ID = "test-key"


def update_failures(registry: CollectorRegistry, reason: str) -> float:
    """Releases that failed for `reason`, whatever the model (a rejected manifest may not name
    one the test expects)."""
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == "agent_model_update_failures"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["reason"] == reason
    )


@dataclass
class Publisher:
    server: ArtifactServer
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def trusted(self) -> dict[str, Ed25519PublicKey]:
        return {KEY_ID: self.key.public_key()}

    def release(
        self, model: bytes, version: int, *, name: str = "m", **options: Any
    ) -> dict[str, Any]:
        """Serve `model` and return its signed manifest."""
        artifact = options.pop("artifact", None) or Artifact(model)
        url = self.server.add(f"{name}/{hashlib.sha256(model).hexdigest()[:12]}.onnx", artifact)
        return build_manifest(
            model, name=name, version=version, url=url, key=self.key, key_id=KEY_ID, **options
        )


@dataclass
class Device:
    """A `ModelManager` with its store, services and recorded status reports."""

    manager: ModelManager
    store: ModelStore
    services: dict[str, InferenceService]
    registry: CollectorRegistry
    reports: list[ModelStatus]

    def states(self, name: str = "m") -> list[str]:
        """The state transitions of `name`, rejections included (a repeat is no transition)."""
        states = [r.state.value for r in self.reports if r.name == name]
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]

    def failures(self, reason: str) -> float:
        return update_failures(self.registry, reason)


def make_device(
    root: Path,
    publisher: Publisher,
    pki: TestPki,
    *,
    probation: ProbationPolicy | None = None,
    store_factory: Callable[[Path], ModelStore] = ModelStore,
    quarantine: Quarantine | None = None,
    observer: ReleaseObserver | None = None,
) -> Device:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    services: dict[str, InferenceService] = {}
    store = store_factory(root)
    store.open()
    reports: list[ModelStatus] = []
    downloader = Downloader(
        DownloadPolicy(allowed_hosts=("127.0.0.1",), max_retries=1, backoff_base_s=0.01),
        ssl_context=pki.client_context(),
    )
    manager = ModelManager(
        store=store,
        trusted_keys=publisher.trusted,
        artifacts=HttpsArtifacts(downloader),
        services=services,
        service_factory=lambda name: InferenceService(name, metrics),
        registry=registry,
        # A fast tick: probations end within a test's patience.
        probation=(probation or ProbationPolicy(requests=0, seconds=0)).model_copy(
            update={"tick_s": 0.05}
        ),
        listeners=[reports.append],
        quarantine=quarantine,
        observer=observer,
    )
    manager.add_rejection_listener(reports.append)
    return Device(manager, store, services, registry, reports)


@pytest.fixture
def publisher(artifact_server: ArtifactServer) -> Publisher:
    return Publisher(artifact_server)

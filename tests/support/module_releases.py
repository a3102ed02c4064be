"""Signed releases for end-to-end tests, served over HTTPS by an artifact server on a thread
of its own.

The tests are synchronous on purpose: the service SDK (requests) and the simulator's calls
block, and a blocking call on the loop that served the artifacts would stall the very
downloads under test. So the artifact server gets a loop and a thread of its own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.manifest import public_key_to_b64, sign_manifest
from deployment.publish.release import build_manifest
from tests.support.artifact_server import Artifact, ArtifactServer, SeenRequest, TestPki

KEY_ID = "release-key"


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

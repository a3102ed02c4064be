"""A small HTTPS file server for the demo's model artifacts (Azure Blob Storage's stand-in).

It presents the simulator's server certificate (issued for the simulator's loopback address
by its per-run CA), so the agent verifies it exactly as it would verify a real blob endpoint.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web


class ArtifactServer:
    def __init__(self, root: Path, *, host: str, certificates: Path) -> None:
        self.root = root
        self.host = host
        self.port = 0
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(certificates / "server.pem", certificates / "server-key.pem")
        root.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.router.add_static("/models", root)
        self._runner = web.AppRunner(app, access_log=None)

    def publish(self, name: str, data: bytes) -> str:
        """Store `data` as `name`; return its URL."""
        (self.root / name).write_bytes(data)
        return f"https://{self.host}:{self.port}/models/{name}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        await self._runner.cleanup()

"""Azurite (npm `azurite` 3.x), the Azure Storage emulator, as a Blob endpoint on loopback.

`make system-deps` installs it into `.tools/azurite` of the repository. It declares Node 22 but
runs on Node 20 when started with `--skipApiVersionCheck --loose`; `--disableTelemetry` keeps it
from calling home (nothing may leave loopback). It binds port 0 and prints the port it got, so
parallel test runs never race for a port.

    with Azurite.start(tmp_path / "azurite") as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string)

`tls=(certificate, key)` serves HTTPS instead (PEM files, e.g. `simulator.certs.generate`'s):
clients then need that certificate's CA, as agents do, which download only over HTTPS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

# The well-known development account every Azure Storage emulator accepts (public, not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
INSTALL_DIR = Path(__file__).resolve().parent.parent / ".tools" / "azurite"
BINARY_ENV = "AZURITE_BLOB_BIN"  # overrides where `azurite-blob` is looked for
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_FILE = "azurite.log"
_LISTENING = re.compile(r"Blob service successfully listens on https?://[^:\s]+:(?P<port>\d+)")


class AzuriteError(RuntimeError):
    """Azurite is missing or did not start; the message says which and how to fix it."""


def find_binary() -> Path:
    """`$AZURITE_BLOB_BIN`, else the project's `.tools/azurite`, else `azurite-blob` on PATH."""
    override = os.environ.get(BINARY_ENV)
    if override:
        return Path(override)
    local = INSTALL_DIR / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    found = shutil.which("azurite-blob")
    if found is not None:
        return Path(found)
    raise AzuriteError("azurite-blob not found: run `make system-deps` (npm package azurite@3)")


def connection_string(blob_endpoint: str) -> str:
    """The storage connection string of the development account at `blob_endpoint`."""
    scheme = blob_endpoint.split("://", 1)[0]
    return (
        f"DefaultEndpointsProtocol={scheme};AccountName={DEV_ACCOUNT};"
        f"AccountKey={DEV_ACCOUNT_KEY};BlobEndpoint={blob_endpoint};"
    )


def listening_port(log_text: str) -> int | None:
    """The port Azurite says it listens on, once it has said so."""
    match = _LISTENING.search(log_text)
    return None if match is None else int(match["port"])


@dataclass
class Azurite:
    """A running Azurite Blob service; `stop()` (or the context manager) ends it."""

    process: subprocess.Popen[bytes]
    host: str
    blob_port: int
    location: Path
    scheme: str = "http"

    @property
    def blob_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.blob_port}/{DEV_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_endpoint)

    @property
    def log_path(self) -> Path:
        return self.location / LOG_FILE

    @classmethod
    def start(
        cls,
        location: Path,
        *,
        host: str = "127.0.0.1",
        binary: Path | None = None,
        timeout: float = START_TIMEOUT_SECONDS,
        tls: tuple[Path, Path] | None = None,
    ) -> Azurite:
        """Start Azurite Blob on `host` (a free port), keeping its data and log in `location`;
        over HTTPS with `tls` (certificate and key PEM files)."""
        executable = binary if binary is not None else find_binary()
        location.mkdir(parents=True, exist_ok=True)
        command = [
            str(executable),
            "--blobHost",
            host,
            "--blobPort",
            "0",
            "--location",
            str(location),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]
        if tls is not None:
            command += ["--cert", str(tls[0]), "--key", str(tls[1])]
        with (location / LOG_FILE).open("wb") as output:
            process = subprocess.Popen(  # noqa: S603  # a fixed argument list, no shell
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        scheme = "https" if tls is not None else "http"
        azurite = cls(process=process, host=host, blob_port=0, location=location, scheme=scheme)
        deadline = time.monotonic() + timeout
        while True:
            port = listening_port(azurite.log_path.read_text(errors="replace"))
            if port is not None:
                azurite.blob_port = port
                log.info("azurite_started", endpoint=azurite.blob_endpoint, pid=process.pid)
                return azurite
            if process.poll() is not None or time.monotonic() > deadline:
                azurite.stop()
                raise AzuriteError(
                    f"azurite did not start (exit {process.returncode}): {azurite.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, characters: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        """Terminate Azurite (kill it if it lingers); safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_SECONDS)
            log.info("azurite_stopped", pid=self.process.pid)

    def __enter__(self) -> Azurite:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

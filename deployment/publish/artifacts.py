"""Model artifacts in Azure Blob Storage: upload once, verify, hand out read-only SAS URLs.

Blobs are named ``<model>/<version>/<sha256>.onnx`` and carry their sha256 as metadata, so an
upload interrupted or repeated is recognised: a blob already holding the right bytes is not
sent again. After an upload the blob is read back and hashed: what devices will fetch is
checked, not what was meant to be sent. The URL handed to devices has a read-only SAS with an
expiry; ``refresh-url`` makes a new one when it runs out.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContentSettings,
    ExponentialRetry,
    generate_blob_sas,
)

from deployment.errors import PublisherError, Reason

log = structlog.get_logger(__name__)

# Devices may start the download a little before the storage clock says the SAS is valid.
SAS_CLOCK_SKEW = timedelta(minutes=5)
READ_CHUNK = 4 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Uploaded:
    blob_name: str
    url: str  # without any query: safe to log and to keep in the registry
    uploaded: bool  # False: the blob already held these bytes


# The storage SDK's default waits 15 s before its first retry: ~22 s of silence before a dead
# endpoint is reported. Short backoffs, a line per retry, and a total bound instead.
DEFAULT_RETRY_BUDGET_S = 20.0
MAX_ATTEMPT_TIMEOUT_S = 10.0


class BudgetRetry(ExponentialRetry):
    """Exponential backoff (1 s, 2 s, 4 s, at most 8 s) that gives a request up once
    ``budget_s`` has passed since it was first sent, and logs each retry it makes."""

    def __init__(
        self,
        endpoint: str,
        budget_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_total: int = 5,
    ) -> None:
        super().__init__(retry_total=retry_total)
        self._endpoint = endpoint
        self._budget_s = budget_s
        self._clock = clock

    def configure_retries(self, request: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().configure_retries(request)
        settings["deadline"] = self._clock() + self._budget_s
        return settings

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return float(min(2 ** max(0, int(settings["count"]) - 1), 8))

    def _remaining(self, settings: dict[str, Any]) -> float:
        return float(settings["deadline"]) - self._clock()

    def increment(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> bool:
        if self._remaining(settings) <= 0:
            return False  # the budget is spent: the caller reports the failure now
        return bool(super().increment(settings, *args, **kwargs))

    def sleep(self, settings: dict[str, Any], transport: Any) -> None:
        remaining = self._remaining(settings)
        wait = max(0.0, min(self.get_backoff_time(settings), remaining))
        history = settings.get("history") or []
        last = history[-1] if history else None
        error = getattr(last, "error", None)
        status = getattr(getattr(last, "http_response", None), "status_code", None)
        log.warning(
            "blob_storage_retry",
            endpoint=self._endpoint,
            retry=int(settings["count"]),
            of=self.total_retries,
            wait_s=round(wait, 1),
            cause=type(error).__name__ if error is not None else f"HTTP {status}",
            gives_up_in_s=round(max(0.0, remaining), 1),
        )
        if wait > 0:
            transport.sleep(wait)


def blob_name(model: str, version: int, sha256: str, suffix: str = "onnx") -> str:
    return f"{model}/{version}/{sha256}.{suffix}"


def _failure(endpoint: str, action: str, error: AzureError) -> PublisherError:
    # The SDK's message may quote the request URL with its query; keep only the kind of error.
    return PublisherError(
        Reason.UNREACHABLE, f"Blob storage {endpoint}: {action} failed: {type(error).__name__}"
    )


class BlobArtifacts:
    """One container of one storage account."""

    def __init__(self, service: BlobServiceClient, container: str) -> None:
        self._service = service
        self._container = container

    @property
    def endpoint(self) -> str:
        """The account's blob endpoint: every artifact URL starts with it."""
        return str(self._service.url)

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        container: str,
        *,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> BlobArtifacts:
        """``retry_budget_s``: how long the command keeps retrying a failing storage endpoint."""
        try:
            service = BlobServiceClient.from_connection_string(connection_string)
            endpoint = str(service.url).split("?", 1)[0].rstrip("/")
            retry = BudgetRetry(endpoint, retry_budget_s, clock=clock)
            service = BlobServiceClient.from_connection_string(
                connection_string,
                retry_policy=retry,
                connection_timeout=min(MAX_ATTEMPT_TIMEOUT_S, retry_budget_s),
                read_timeout=60,
            )
        except ValueError as e:
            raise PublisherError(Reason.CONFIG, "the storage connection string is malformed") from e
        if not getattr(service.credential, "account_key", None):
            raise PublisherError(
                Reason.CONFIG,
                "the storage connection string has no AccountKey (needed to sign SAS URLs)",
            )
        return cls(service, container)

    def upload(
        self, path: Path, name: str, sha256: str, progress: Progress | None = None
    ) -> Uploaded:
        container = self._service.get_container_client(self._container)
        blob = container.get_blob_client(name)
        try:
            with contextlib.suppress(ResourceExistsError):
                container.create_container()
            try:
                existing = blob.get_blob_properties()
                if (
                    existing.metadata.get("sha256") == sha256
                    and self._stored_sha256(name) == sha256
                ):
                    return Uploaded(name, blob.url, uploaded=False)
            except ResourceNotFoundError:
                pass
            size = path.stat().st_size
            hook = None
            if progress is not None:
                report = progress

                def hook(current: int, total: int | None) -> None:
                    report(current, total or size)

            with path.open("rb") as data:
                blob.upload_blob(
                    data,
                    length=size,
                    overwrite=True,
                    metadata={"sha256": sha256},
                    content_settings=ContentSettings(content_type="application/octet-stream"),
                    validate_content=True,
                    progress_hook=hook,
                )
            stored = self._stored_sha256(name)
        except AzureError as e:
            raise _failure(self._service.url, "upload", e) from e
        if stored != sha256:
            raise PublisherError(
                Reason.UPLOAD_FAILED,
                f"blob {name} holds bytes with sha256 {stored}, expected {sha256}",
            )
        return Uploaded(name, blob.url, uploaded=True)

    def _stored_sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        stream = self._service.get_blob_client(self._container, name).download_blob()
        for chunk in stream.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def read_url(self, name: str, expiry: datetime, now: datetime) -> str:
        """A read-only SAS URL for one blob, valid until ``expiry``."""
        blob = self._service.get_blob_client(self._container, name)
        try:
            blob.get_blob_properties()
        except ResourceNotFoundError as e:
            raise PublisherError(
                Reason.NOT_FOUND, f"blob {name} is not in container {self._container}"
            ) from e
        except AzureError as e:
            raise _failure(self._service.url, "read", e) from e
        token = generate_blob_sas(
            account_name=str(self._service.account_name),
            container_name=self._container,
            blob_name=name,
            account_key=self._service.credential.account_key,
            permission=BlobSasPermissions(read=True),
            expiry=expiry,
            start=now - SAS_CLOCK_SKEW,
        )
        return f"{blob.url}?{token}"

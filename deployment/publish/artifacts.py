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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContentSettings,
    generate_blob_sas,
)

from deployment.errors import PublisherError, Reason

# Devices may start the download a little before the storage clock says the SAS is valid.
SAS_CLOCK_SKEW = timedelta(minutes=5)
READ_CHUNK = 4 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Uploaded:
    blob_name: str
    url: str  # without any query: safe to log and to keep in the registry
    uploaded: bool  # False: the blob already held these bytes


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
    def from_connection_string(cls, connection_string: str, container: str) -> BlobArtifacts:
        try:
            service = BlobServiceClient.from_connection_string(
                connection_string, retry_total=1, connection_timeout=10, read_timeout=60
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

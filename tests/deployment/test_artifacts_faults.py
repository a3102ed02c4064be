"""Blob storage that does not answer: the upload gives up within its budget, a line per retry."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import structlog

from deployment.errors import PublisherError, Reason
from deployment.publish.artifacts import BlobArtifacts
from simulator.azurite import DEV_ACCOUNT, DEV_ACCOUNT_KEY


def _dead_endpoint() -> str:
    """A loopback port nobody listens on: every connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{DEV_ACCOUNT}"


@pytest.mark.parametrize("budget_s", [2.0, 4.0])
def test_an_upload_to_a_dead_endpoint_gives_up_within_its_budget_saying_each_retry(
    tmp_path: Path, budget_s: float
) -> None:
    endpoint = _dead_endpoint()
    blobs = BlobArtifacts.from_connection_string(
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};"
        f"BlobEndpoint={endpoint};",
        "models",
        retry_budget_s=budget_s,
    )
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs, pytest.raises(PublisherError) as caught:
        blobs.upload(model, "m/1/x.onnx", "x")
    elapsed = time.monotonic() - started
    assert caught.value.reason == Reason.UNREACHABLE
    assert endpoint in caught.value.message
    # The SDK's own policy waited ~22 s here: the budget bounds the whole give-up.
    assert budget_s - 0.5 <= elapsed < budget_s + 3
    retries = [entry for entry in logs if entry["event"] == "blob_storage_retry"]
    assert [entry["retry"] for entry in retries] == list(range(1, len(retries) + 1))
    assert len(retries) >= 2
    assert {entry["cause"] for entry in retries} == {"ServiceRequestError"}
    assert all(entry["endpoint"] == endpoint for entry in retries)
    assert retries[-1]["gives_up_in_s"] < budget_s

"""The Azurite launcher: the port it reports, and a real upload read back through the Blob SDK."""

from __future__ import annotations

import pytest
from azure.storage.blob import BlobServiceClient

from simulator.azurite import DEV_ACCOUNT, Azurite, connection_string, listening_port


@pytest.mark.parametrize(
    ("log_text", "port"),
    [
        ("", None),
        ("Azurite Blob service is starting on 127.0.0.1:0\n", None),
        ("Azurite Blob service successfully listens on http://127.0.0.1:35383\n", 35383),
        ("noise\nAzurite Blob service successfully listens on http://127.0.0.9:10000", 10000),
    ],
)
def test_listening_port_is_read_from_the_log(log_text: str, port: int | None) -> None:
    assert listening_port(log_text) == port


def test_connection_string_names_the_dev_account_and_endpoint() -> None:
    text = connection_string("http://127.0.0.1:1234/devstoreaccount1")
    fields = dict(part.split("=", 1) for part in text.rstrip(";").split(";"))
    assert fields["AccountName"] == DEV_ACCOUNT
    assert fields["BlobEndpoint"] == "http://127.0.0.1:1234/devstoreaccount1"


@pytest.mark.e2e
def test_a_blob_uploaded_to_azurite_reads_back(azurite: Azurite) -> None:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container("launcher-roundtrip")
    container.upload_blob("a/b.json", b'{"x": 1}')
    assert container.download_blob("a/b.json").readall() == b'{"x": 1}'
    assert [blob.name for blob in container.list_blobs()] == ["a/b.json"]
    assert azurite.blob_endpoint.startswith(f"http://127.0.0.1:{azurite.blob_port}/")

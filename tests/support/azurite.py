"""Azurite for tests: one Blob service per test session, on loopback, data in a temp folder.

Use it from any test package by re-exporting the fixture in that package's `conftest.py`:

    from tests.support.azurite import azurite  # noqa: F401  (a fixture: pytest finds it by name)

    def test_upload(azurite: Azurite) -> None:
        BlobServiceClient.from_connection_string(azurite.connection_string)

Give each test its own container name: the service is shared by the whole session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from simulator.azurite import Azurite, AzuriteError, find_binary


def azurite_binary_or_skip() -> None:
    """In CI a missing Azurite is a setup error (`make system-deps`), not a reason to skip."""
    try:
        find_binary()
    except AzuriteError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A running Azurite Blob service: `.connection_string`, `.blob_endpoint`."""
    azurite_binary_or_skip()
    with Azurite.start(tmp_path_factory.mktemp("azurite")) as running:
        yield running

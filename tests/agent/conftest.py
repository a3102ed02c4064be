"""Fixtures for tests/agent; each group lives in its own module and is registered here."""

from tests.support.artifact_server import (  # noqa: F401 -- importing registers the fixtures
    artifact_pki,
    artifact_server,
    expired_cert_server,
    self_signed_server,
)
from tests.support.releases import publisher  # noqa: F401 -- importing registers the fixture

"""Fixtures for tests/agent; each group lives in its own module and is registered here."""

from tests.agent.artifact_server import (  # noqa: F401 -- importing registers the fixtures
    artifact_pki,
    artifact_server,
    expired_cert_server,
    self_signed_server,
)
from tests.agent.releases import publisher  # noqa: F401 -- importing registers the fixture

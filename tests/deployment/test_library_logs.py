"""Library log records in the CLI's process: structured, and the publisher's own failures
demoted so stderr keeps one line per error."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from deployment.library_logs import routed_level
from tests.deployment.conftest import REPO


@pytest.mark.parametrize(
    ("name", "level", "routed"),
    [
        ("azure.core.pipeline.transport._requests_basic", logging.WARNING, logging.DEBUG),
        ("mlflow.store.db.utils", logging.ERROR, logging.DEBUG),
        ("azure.core.pipeline.policies", logging.WARNING, logging.WARNING),
        ("mlflow.store", logging.ERROR, logging.ERROR),
        ("azure.core.pipeline.transportation", logging.WARNING, logging.WARNING),
    ],
)
def test_a_library_record_s_level(name: str, level: int, routed: int) -> None:
    assert routed_level(name, level) == routed


SCRIPT = """
import logging, sys
from agent.logs import configure_logging
from deployment import library_logs
import mlflow  # sets up its own stream handler, as in the CLI
configure_logging(sys.argv[1], stream=sys.stderr)
library_logs.route(sys.argv[1])
logging.getLogger("azure.core.pipeline.transport._requests_basic").warning("Incomplete download.")
try:
    raise RuntimeError("boom")
except RuntimeError:
    logging.getLogger("mlflow.store.db.utils").exception("SQLAlchemy database error.")
logging.getLogger("azure.core.pipeline.policies").warning("retrying %s", "upload")
"""


def _stderr(level: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, level],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stderr.strip().splitlines()


def test_library_records_go_through_structlog_and_known_failures_only_at_debug() -> None:
    lines = _stderr("warning")
    assert [json.loads(line)["event"] for line in lines] == ["retrying upload"]
    assert json.loads(lines[0])["library"] == "azure.core.pipeline.policies"
    debug = [json.loads(line) for line in _stderr("debug")]
    events = [(e["event"], e["level"]) for e in debug]
    assert ("Incomplete download.", "debug") in events
    assert ("SQLAlchemy database error.", "debug") in events
    assert "Traceback" not in json.dumps(debug)

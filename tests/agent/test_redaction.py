"""Secrets and line breaks never reach a log line as they are (pure, and through structlog)."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from agent.logs import configure_logging
from agent.redaction import redact_text, redact_value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "https://acct.blob.core.windows.net/models/a.onnx?sv=2024&sig=abc%2Bdef&se=1",
            "https://acct.blob.core.windows.net/models/a.onnx?<redacted>",
        ),
        (
            "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=c2VjcmV0PT0=",
            "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=<redacted>",
        ),
        (
            "SharedAccessSignature sr=h%2Fdevices%2Fd&sig=XYZ%3D&se=17",
            "SharedAccessSignature <redacted>",
        ),
        ("token sig=abc&se=1", "token sig=<redacted>&se=1"),
        ("line one\r\nFORGED level=info", "line one\\r\\nFORGED level=info"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_redact_value_walks_nested_structures() -> None:
    value = {"urls": ["https://h/p?sig=1"], "n": 3, "inner": {"k": "SharedAccessKey=x"}}
    assert redact_value(value) == {
        "urls": ["https://h/p?<redacted>"],
        "n": 3,
        "inner": {"k": "SharedAccessKey=<redacted>"},
    }


def test_configured_logger_writes_one_json_line_with_secrets_redacted() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        structlog.get_logger("t").info(
            "download_failed", url="https://h/m.onnx?sig=s3cret", note="a\nlevel=error forged"
        )
        try:
            _fail_with_secret()
        except RuntimeError:
            structlog.get_logger("t").exception("boom")
    finally:
        structlog.reset_defaults()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["url"] == "https://h/m.onnx?<redacted>"
    assert first["note"] == "a\\nlevel=error forged"
    assert "s3cret" not in out.getvalue()
    assert "RuntimeError" in second["exception"]


def _fail_with_secret() -> None:
    raise RuntimeError("connect failed for SharedAccessKey=s3cret")

"""Scrubbing secrets and line breaks out of logged values. Pure.

Connection strings, SAS tokens and pre-signed URLs reach log calls through exception texts
and URLs; redacting at the last processor catches them wherever they came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

REDACTED: Final = "<redacted>"

_PATTERNS: Final = (
    # A URL's query string carries SAS signatures and tokens: keep scheme, host and path.
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"']*)\?[^\s#\"']*"), rf"\1?{REDACTED}"),
    (re.compile(r"(?i)(SharedAccessKey\s*=\s*)[^;\s\"']+"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)(\bsig\s*=\s*)[^&;\s\"']+"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)(SharedAccessSignature\s+)[^\s\"']+"), rf"\1{REDACTED}"),
)
_LINE_BREAKS: Final = str.maketrans({"\r": "\\r", "\n": "\\n"})


def redact_text(text: str) -> str:
    """Mask secrets, then escape CR/LF so a value cannot forge a log line."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text.translate(_LINE_BREAKS)


def redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    return value

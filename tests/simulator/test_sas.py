"""SAS tokens: what the SDKs produce verifies; everything else is refused with a reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse

import pytest

from simulator import sas

KEY = base64.b64encode(b"k" * 32).decode()
OTHER_KEY = base64.b64encode(b"o" * 32).decode()
RESOURCE = "127.0.0.5/devices/dev/modules/mod"
NOW = 1_800_000_000


def _device_sdk_token(resource: str, key: str, expiry: int) -> str:
    """Built the way azure-iot-device's SasToken does (quote with safe="")."""
    encoded = urllib.parse.quote(resource, safe="")
    digest = hmac.digest(base64.b64decode(key), f"{encoded}\n{expiry}".encode(), hashlib.sha256)
    signature = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}"


def _service_sdk_token(host: str, key: str, expiry: int) -> str:
    """Built the way azure-iot-hub's SasToken does (quote_plus, and skn)."""
    encoded = urllib.parse.quote_plus(host)
    digest = hmac.digest(base64.b64decode(key), f"{encoded}\n{expiry}".encode(), hashlib.sha256)
    signature = urllib.parse.quote(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}&skn=iothubowner"


def test_a_device_sdk_token_verifies() -> None:
    token = _device_sdk_token(RESOURCE, KEY, NOW + 60)
    assert sas.verify(token, resource=RESOURCE, key=KEY, now=NOW) is sas.Verdict.VALID


def test_a_service_sdk_token_verifies_with_its_policy() -> None:
    token = _service_sdk_token("127.0.0.5:8443", KEY, NOW + 60)
    verdict = sas.verify(token, resource="127.0.0.5:8443", key=KEY, now=NOW, key_name="iothubowner")
    assert verdict is sas.Verdict.VALID


def test_generate_matches_the_device_sdk() -> None:
    assert sas.generate(RESOURCE, KEY, NOW) == _device_sdk_token(RESOURCE, KEY, NOW)


@pytest.mark.parametrize(
    ("token", "resource", "key", "key_name", "verdict"),
    [
        (_device_sdk_token(RESOURCE, OTHER_KEY, NOW + 60), RESOURCE, KEY, None, "bad_signature"),
        (_device_sdk_token(RESOURCE, KEY, NOW), RESOURCE, KEY, None, "expired"),
        (_device_sdk_token(RESOURCE, KEY, NOW - 1), RESOURCE, KEY, None, "expired"),
        (
            _device_sdk_token("127.0.0.5/devices/dev/modules/other", KEY, NOW + 60),
            RESOURCE,
            KEY,
            None,
            "wrong_resource",
        ),
        (
            _device_sdk_token(RESOURCE, KEY, NOW + 60),
            RESOURCE,
            KEY,
            "iothubowner",
            "wrong_key_name",
        ),
        ("sr=a&sig=b&se=1", RESOURCE, KEY, None, "malformed"),
        ("SharedAccessSignature sr=a&sig=b", RESOURCE, KEY, None, "malformed"),
        ("SharedAccessSignature sr=a&sig=b&se=soon", RESOURCE, KEY, None, "malformed"),
        ("SharedAccessSignature sr=a&sr=a&sig=b&se=1", RESOURCE, KEY, None, "malformed"),
        ("SharedAccessSignature sr=a&sig=b&se=1&x=2", RESOURCE, KEY, None, "malformed"),
        ("", RESOURCE, KEY, None, "malformed"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(
    token: str, resource: str, key: str, key_name: str | None, verdict: str
) -> None:
    result = sas.verify(token, resource=resource, key=key, now=NOW, key_name=key_name)
    assert result.value == verdict


def test_the_resource_compares_without_case() -> None:
    token = _device_sdk_token(RESOURCE.upper(), KEY, NOW + 60)
    assert sas.verify(token, resource=RESOURCE, key=KEY, now=NOW) is sas.Verdict.VALID


def test_new_keys_are_32_random_bytes() -> None:
    first, second = sas.new_key(), sas.new_key()
    assert len(base64.b64decode(first)) == 32
    assert first != second

"""Shared access signature tokens as IoT Hub issues and checks them (pure).

A token is `SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded base64 HMAC>&se=<unix
expiry>[&skn=<policy>]`. The HMAC-SHA256 covers `<sr as sent>\\n<se>`, keyed with the base64-decoded
key. The device SDK encodes `sr` with `quote(safe="")` and the service SDK with `quote_plus`; both
sign the encoded form they send, so the check signs `sr` exactly as received.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import urllib.parse
from dataclasses import dataclass

PREFIX = "SharedAccessSignature "


class SasError(ValueError):
    """The string is not a SAS token."""


class Verdict(enum.Enum):
    VALID = "valid"
    MALFORMED = "malformed"
    WRONG_RESOURCE = "wrong_resource"
    WRONG_KEY_NAME = "wrong_key_name"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"


@dataclass(frozen=True)
class SasToken:
    encoded_resource: str
    signature: str
    expiry: int
    key_name: str | None

    @property
    def resource(self) -> str:
        return urllib.parse.unquote_plus(self.encoded_resource)


def new_key() -> str:
    """A fresh symmetric key: 32 random bytes, base64, like the ones IoT Hub generates."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _signature(encoded_resource: str, expiry: int, key: str) -> str:
    try:
        raw_key = base64.b64decode(key, validate=True)
    except binascii.Error as exc:
        raise SasError("key is not base64") from exc
    message = f"{encoded_resource}\n{expiry}".encode()
    return base64.b64encode(hmac.digest(raw_key, message, hashlib.sha256)).decode("ascii")


def generate(resource: str, key: str, expiry: int, key_name: str | None = None) -> str:
    """A token for `resource` (unencoded, e.g. `host/devices/d/modules/m`)."""
    encoded = urllib.parse.quote(resource, safe="")
    signature = urllib.parse.quote(_signature(encoded, expiry, key), safe="")
    token = f"{PREFIX}sr={encoded}&sig={signature}&se={expiry}"
    return f"{token}&skn={key_name}" if key_name else token


def parse(token: str) -> SasToken:
    if not token.startswith(PREFIX):
        raise SasError("missing 'SharedAccessSignature ' prefix")
    fields: dict[str, str] = {}
    for part in token[len(PREFIX) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep or name in fields:
            raise SasError(f"bad or repeated field {name!r}")
        fields[name] = value
    unknown = set(fields) - {"sr", "sig", "se", "skn"}
    if unknown or not {"sr", "sig", "se"} <= set(fields):
        raise SasError("fields must be sr, sig, se and optionally skn")
    try:
        expiry = int(fields["se"])
    except ValueError as exc:
        raise SasError("se is not an integer") from exc
    return SasToken(
        encoded_resource=fields["sr"],
        signature=urllib.parse.unquote(fields["sig"]),
        expiry=expiry,
        key_name=fields.get("skn"),
    )


def verify(
    token: str,
    *,
    resource: str,
    key: str,
    now: float,
    key_name: str | None = None,
) -> Verdict:
    """Whether `token` grants access to `resource` (compared case-insensitively, like IoT Hub)."""
    try:
        parsed = parse(token)
    except SasError:
        return Verdict.MALFORMED
    if parsed.resource.lower().rstrip("/") != resource.lower().rstrip("/"):
        return Verdict.WRONG_RESOURCE
    if key_name is not None and parsed.key_name != key_name:
        return Verdict.WRONG_KEY_NAME
    expected = _signature(parsed.encoded_resource, parsed.expiry, key)
    if not hmac.compare_digest(expected.encode(), parsed.signature.encode()):
        return Verdict.BAD_SIGNATURE
    if parsed.expiry <= now:
        return Verdict.EXPIRED
    return Verdict.VALID

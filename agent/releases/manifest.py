"""The signed release manifest: canonical JSON, Ed25519 signing and verification, keys.

The document's shape is `wire.manifest` (re-exported here); this module decides whether a
document may be acted on. It travels inside the desired twin (at most 32 KB), so artifacts
are referenced by URL, never inlined.

The signature covers the canonical JSON of every field except ``signature``: keys sorted, no
whitespace, UTF-8, NaN and infinities refused (they are not JSON). The device verifies the
signature over the document *as received* (before any parsing into typed values), so the
cloud and the device need not agree on how to re-serialise a parsed model.

Everything here is pure except :func:`load_trusted_keys` and :func:`load_private_key`, which
read key files. The cloud side imports this module to sign.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from agent.config import Section
from wire.bounded_json import BoundedJsonError, JsonLimits, check_value, loads
from wire.manifest import (
    MAX_MANIFEST_BYTES,
    Baseline,
    Contract,
    Golden,
    ReleaseManifest,
    Signature,
    Tensor,
    UnsignedManifest,
)
from wire.reasons import AgentError, Reason

__all__ = [
    "MAX_MANIFEST_BYTES",
    "Baseline",
    "Contract",
    "Golden",
    "KeyConfigError",
    "ManifestRejected",
    "ReleaseManifest",
    "ReleaseStatus",
    "SeenRelease",
    "Signature",
    "Tensor",
    "UnsignedManifest",
    "canonical_json",
    "check_version",
    "load_private_key",
    "load_trusted_keys",
    "parse_trusted_keys",
    "private_key_from_pem",
    "public_key_from_b64",
    "public_key_from_pem",
    "public_key_to_b64",
    "schema_message",
    "sign_manifest",
    "verify_manifest",
]

# A manifest's own nesting (contract, tensors, golden data of up to a few dimensions) is far
# below this; the signature adds one level and a few hundred bytes.
MANIFEST_LIMITS = JsonLimits(max_bytes=MAX_MANIFEST_BYTES + 1024, max_depth=40)

_SIGNATURE_BYTES = 64
_PUBLIC_KEY_BYTES = 32


class ManifestRejected(AgentError):  # noqa: N818 -- the name the swap pipeline and reports use
    """A manifest that must not be acted on."""


class KeyConfigError(ValueError):
    """A trusted-key or signing-key configuration that cannot be used."""


class ReleaseStatus(enum.Enum):
    """Outcome of :func:`check_version` for a manifest that is not rejected."""

    NEW = "new"
    SAME_RELEASE = "same_release"


# --- canonical form and signatures ---------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    """Canonical bytes that are signed: sorted keys, no whitespace, UTF-8, no NaN/Infinity.

    Raises ``TypeError`` for values JSON cannot carry and ``ValueError`` for NaN/Infinity.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def schema_message(err: ValidationError) -> str:
    """The first few problems of a manifest, by field path."""
    # Input values are left out on purpose: they are untrusted and may be huge.
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()[:3]
    ]
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _parse(document: Mapping[str, Any]) -> ReleaseManifest:
    try:
        text = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, f"not JSON: {type(e).__name__}") from e
    try:
        # Strict JSON-mode validation: the twin arrives as JSON, so types must be JSON-exact.
        return ReleaseManifest.model_validate_json(text)
    except ValidationError as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, schema_message(e)) from e


def sign_manifest(
    unsigned: Mapping[str, Any] | UnsignedManifest, private_key: Ed25519PrivateKey, key_id: str
) -> dict[str, Any]:
    """Return a signed copy of ``unsigned``; the result is checked against the schema.

    ``unsigned`` is the publisher's typed :class:`UnsignedManifest`, or a raw document (tests
    sign malformed ones on purpose).

    Raises ``ValueError`` if ``unsigned`` already has a signature, :class:`ManifestRejected`
    (``schema_invalid``) if the signed document would not pass :func:`verify_manifest`.
    """
    if isinstance(unsigned, UnsignedManifest):
        unsigned = unsigned.document()
    if "signature" in unsigned:
        raise ValueError("manifest already carries a signature")
    try:
        payload = canonical_json(unsigned)
    except (TypeError, ValueError, RecursionError) as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, f"not JSON: {type(e).__name__}") from e
    signed: dict[str, Any] = json.loads(payload)  # a plain-JSON copy, detached from the input
    signed["signature"] = {
        "key_id": key_id,
        "value": base64.b64encode(private_key.sign(payload)).decode("ascii"),
    }
    _parse(signed)
    return signed


def load_manifest_json(data: bytes | str) -> Any:
    """A manifest file's JSON, size and depth bounded; `ManifestRejected` (`schema_invalid`)
    naming what was wrong. What it holds is for `verify_manifest` to check."""
    try:
        return loads(data, MANIFEST_LIMITS)
    except BoundedJsonError as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, f"manifest {e.problem}: {e.message}") from e


def verify_manifest(
    raw: object, trusted_keys: Mapping[str, Ed25519PublicKey], now: datetime
) -> ReleaseManifest:
    """Check the signature with a pinned key, then the schema, then expiry.

    The signature is checked before the schema so that nothing but signed content is ever
    parsed into typed values (and a forged document learns nothing about the schema).
    Raises :class:`ManifestRejected` with ``schema_invalid``, ``signature_missing``,
    ``signature_invalid``, ``unknown_key`` or ``expired``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not isinstance(raw, Mapping):
        raise ManifestRejected(Reason.SCHEMA_INVALID, "manifest is not a JSON object")
    try:
        check_value(raw, MANIFEST_LIMITS)  # before anything recursive (the canonical form) runs
    except BoundedJsonError as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, f"manifest {e.problem}: {e.message}") from e
    signature = raw.get("signature")
    if signature is None:
        raise ManifestRejected(Reason.SIGNATURE_MISSING, "manifest is not signed")
    key_id, sig_bytes = _signature_parts(signature)
    key = trusted_keys.get(key_id)
    if key is None:
        raise ManifestRejected(Reason.UNKNOWN_KEY, f"no trusted key {key_id!r}")
    unsigned = {k: v for k, v in raw.items() if k != "signature"}
    try:
        payload = canonical_json(unsigned)
    except (TypeError, ValueError, RecursionError) as e:
        raise ManifestRejected(Reason.SCHEMA_INVALID, f"not JSON: {type(e).__name__}") from e
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ManifestRejected(
            Reason.SCHEMA_INVALID, f"manifest larger than {MAX_MANIFEST_BYTES} bytes"
        )
    try:
        key.verify(sig_bytes, payload)
    except InvalidSignature as e:
        raise ManifestRejected(
            Reason.SIGNATURE_INVALID, f"signature does not verify with key {key_id!r}"
        ) from e
    manifest = _parse(raw)
    if manifest.expires is not None and now >= manifest.expires:
        raise ManifestRejected(Reason.EXPIRED, f"expired at {manifest.expires.isoformat()}")
    return manifest


def _signature_parts(signature: object) -> tuple[str, bytes]:
    if not isinstance(signature, Mapping) or set(signature) != {"key_id", "value"}:
        raise ManifestRejected(Reason.SIGNATURE_INVALID, "signature must be {key_id, value}")
    key_id, value = signature["key_id"], signature["value"]
    if not isinstance(key_id, str) or not isinstance(value, str):
        raise ManifestRejected(Reason.SIGNATURE_INVALID, "signature fields must be strings")
    try:
        sig_bytes = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ManifestRejected(Reason.SIGNATURE_INVALID, "signature is not base64") from e
    if len(sig_bytes) != _SIGNATURE_BYTES:
        raise ManifestRejected(
            Reason.SIGNATURE_INVALID, f"signature is not {_SIGNATURE_BYTES} bytes"
        )
    return key_id, sig_bytes


# --- version monotonicity ------------------------------------------------------------------


class SeenRelease(Protocol):
    """What :func:`check_version` needs of the highest release seen (``store.ModelRef`` fits)."""

    @property
    def version(self) -> int: ...

    @property
    def sha256(self) -> str: ...


def check_version(manifest: ReleaseManifest, highest_seen: SeenRelease | None) -> ReleaseStatus:
    """Versions never go backwards: a higher version is ``NEW``; the same version and hash is
    ``SAME_RELEASE`` (a replay: nothing to fetch if it is active); anything else is rejected
    with ``version_not_monotonic``.
    """
    if highest_seen is None or manifest.version > highest_seen.version:
        return ReleaseStatus.NEW
    if manifest.version == highest_seen.version and manifest.sha256 == highest_seen.sha256:
        return ReleaseStatus.SAME_RELEASE
    if manifest.version == highest_seen.version:
        raise ManifestRejected(
            Reason.VERSION_NOT_MONOTONIC,
            f"version {manifest.version} was already seen with a different sha256",
        )
    raise ManifestRejected(
        Reason.VERSION_NOT_MONOTONIC,
        f"version {manifest.version} is lower than {highest_seen.version} already seen",
    )


# --- keys ----------------------------------------------------------------------------------


def public_key_from_b64(value: str) -> Ed25519PublicKey:
    """A public key from base64 of its 32 raw bytes (the form kept in env-style settings)."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyConfigError("public key is not base64") from e
    if len(raw) != _PUBLIC_KEY_BYTES:
        raise KeyConfigError(f"public key is {len(raw)} bytes, Ed25519 needs {_PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_to_b64(key: Ed25519PublicKey) -> str:
    """Base64 of the 32 raw bytes: the form :func:`public_key_from_b64` reads."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_pem(data: bytes) -> Ed25519PublicKey:
    """A public key from a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) block."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyConfigError("not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyConfigError(f"PEM key is {type(key).__name__}, not Ed25519")
    return key


def private_key_from_pem(data: bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    """A signing key from a PEM ``PRIVATE KEY`` (PKCS#8) block."""
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as e:
        raise KeyConfigError("not a usable PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyConfigError(f"PEM key is {type(key).__name__}, not Ed25519")
    return key


_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _key_id(candidate: str) -> str:
    if not _KEY_ID.fullmatch(candidate):
        raise KeyConfigError(f"invalid key id {candidate!r}: use 1-64 of [A-Za-z0-9._-]")
    return candidate


def parse_trusted_keys(spec: str) -> dict[str, Ed25519PublicKey]:
    """Parse ``"key_id=BASE64, other=BASE64"`` (commas, semicolons or whitespace separate).

    The env-style form of the trusted keys; an empty string gives no keys.
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for raw_item in spec.replace(";", ",").replace("\n", ",").split(","):
        item = raw_item.strip()
        if not item:
            continue
        key_id, sep, value = item.partition("=")
        if not sep:
            raise KeyConfigError("trusted key entries look like key_id=BASE64")
        key_id = _key_id(key_id.strip())
        if key_id in keys:
            raise KeyConfigError(f"trusted key {key_id!r} given twice")
        keys[key_id] = public_key_from_b64(value)
    return keys


class KeySettings(Section):
    """Whose manifests the device acts on: `key_id=BASE64,...` and/or a folder of PEM files."""

    trusted_keys: str = ""
    trusted_keys_dir: Path | None = None

    def load(self) -> dict[str, Ed25519PublicKey]:
        pems = sorted(self.trusted_keys_dir.glob("*.pem")) if self.trusted_keys_dir else []
        return load_trusted_keys(self.trusted_keys, pems)


def load_trusted_keys(
    spec: str = "", pem_files: Iterable[Path] = ()
) -> dict[str, Ed25519PublicKey]:
    """Trusted keys from an env-style ``spec`` and PEM files (the key id is the file's stem).

    The only function here besides :func:`load_private_key` that touches the file system.
    """
    keys = parse_trusted_keys(spec)
    for path in pem_files:
        key_id = _key_id(path.stem)
        if key_id in keys:
            raise KeyConfigError(f"trusted key {key_id!r} given twice")
        keys[key_id] = public_key_from_pem(_read_key_file(path))
    return keys


def load_private_key(path: Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read a PEM signing key (cloud side)."""
    return private_key_from_pem(_read_key_file(path), password)


# A PEM key is a few hundred bytes: a larger file is not one, and is not read whole.
MAX_KEY_FILE_BYTES = 16 * 1024


def _read_key_file(path: Path) -> bytes:
    with path.open("rb") as file:
        data = file.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyConfigError(f"{path.name} is over {MAX_KEY_FILE_BYTES} bytes: not a PEM key")
    return data

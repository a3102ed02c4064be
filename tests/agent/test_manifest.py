"""Release manifest: canonical JSON, signatures, schema, expiry, versions."""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.releases.manifest import (
    KeyConfigError,
    ManifestRejected,
    ReleaseManifest,
    ReleaseStatus,
    canonical_json,
    check_version,
    load_private_key,
    load_trusted_keys,
    parse_trusted_keys,
    public_key_from_b64,
    public_key_to_b64,
    sign_manifest,
    verify_manifest,
)
from wire.reasons import Reason

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64

# Fixed seeds keep the tests deterministic; these keys protect nothing.
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = {"release-2026": SIGNING_KEY.public_key()}


def unsigned_manifest(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": 2,
        "name": "anomaly",
        "version": 7,
        "sha256": SHA_A,
        "size": 1234,
        "url": "https://models.example.net/anomaly/7.onnx?sig=secret",
        "created": "2026-11-25T08:00:00Z",
        "expires": "2026-12-25T08:00:00+00:00",
        "contract": {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
        },
        "baseline": {
            "sha256": SHA_B,
            "size": 2048,
            "url": "https://models.example.net/anomaly/7.json",
        },
        "golden": {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4.5]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [0.25]}],
            "atol": 1e-4,
        },
    }
    doc.update(overrides)
    return doc


def signed(**overrides: Any) -> dict[str, Any]:
    return sign_manifest(unsigned_manifest(**overrides), SIGNING_KEY, "release-2026")


def rejected_reason(raw: object, now: datetime = NOW) -> Reason:
    with pytest.raises(ManifestRejected) as info:
        verify_manifest(raw, TRUSTED, now)
    return info.value.reason


# --- canonical JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        ({"a": [1, {"d": None, "c": True}]}, b'{"a":[1,{"c":true,"d":null}]}'),
        ({"name": "café"}, '{"name":"café"}'.encode()),
        ({"x": 1.5, "y": 1.0}, b'{"x":1.5,"y":1.0}'),
        ({"s": 'quote" and \\ slash'}, b'{"s":"quote\\" and \\\\ slash"}'),
        ({}, b"{}"),
    ],
)
def test_canonical_json_is_sorted_compact_utf8(obj: object, expected: bytes) -> None:
    assert canonical_json(obj) == expected


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": float("inf")}, {"x": {1, 2}}])
def test_canonical_json_refuses_what_json_cannot_carry(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        canonical_json(bad)


# --- signing and verification --------------------------------------------------------------


def test_signed_manifest_verifies_into_typed_values() -> None:
    manifest = verify_manifest(signed(), TRUSTED, NOW)
    assert isinstance(manifest, ReleaseManifest)
    assert (manifest.name, manifest.version, manifest.sha256, manifest.size) == (
        "anomaly",
        7,
        SHA_A,
        1234,
    )
    assert manifest.contract.inputs[0].shape == (-1, 4)
    assert manifest.contract_change is False
    assert manifest.golden is not None
    assert manifest.golden.outputs[0].data == (0.25,)
    assert manifest.signature.key_id == "release-2026"


def test_signature_covers_canonical_json_of_everything_but_signature() -> None:
    doc = signed()
    payload = canonical_json({k: v for k, v in doc.items() if k != "signature"})
    SIGNING_KEY.public_key().verify(base64.b64decode(doc["signature"]["value"]), payload)


def test_key_order_of_the_received_document_does_not_matter() -> None:
    doc = signed()
    reordered = dict(reversed(list(doc.items())))
    assert verify_manifest(reordered, TRUSTED, NOW).version == 7


def test_sign_does_not_alias_or_mutate_its_input() -> None:
    unsigned = unsigned_manifest()
    before = copy.deepcopy(unsigned)
    doc = sign_manifest(unsigned, SIGNING_KEY, "release-2026")
    doc["contract"]["inputs"][0]["name"] = "changed"
    assert unsigned == before


def test_sign_refuses_an_already_signed_document() -> None:
    with pytest.raises(ValueError, match="already"):
        sign_manifest(signed(), SIGNING_KEY, "release-2026")


def test_sign_refuses_a_schema_invalid_document() -> None:
    with pytest.raises(ManifestRejected) as info:
        sign_manifest(unsigned_manifest(version=0), SIGNING_KEY, "release-2026")
    assert info.value.reason is Reason.SCHEMA_INVALID


def _tamper(doc: dict[str, Any]) -> dict[str, Any]:
    doc["url"] = "https://evil.example.net/x.onnx"
    return doc


def _drop_signature(doc: dict[str, Any]) -> dict[str, Any]:
    del doc["signature"]
    return doc


def _null_signature(doc: dict[str, Any]) -> dict[str, Any]:
    doc["signature"] = None
    return doc


def _other_key_same_id(doc: dict[str, Any]) -> dict[str, Any]:
    return sign_manifest(_drop_signature(doc), OTHER_KEY, "release-2026")


def _unknown_key(doc: dict[str, Any]) -> dict[str, Any]:
    return sign_manifest(_drop_signature(doc), OTHER_KEY, "someone-else")


def _garbage_value(doc: dict[str, Any]) -> dict[str, Any]:
    doc["signature"]["value"] = "not base64!"
    return doc


def _short_value(doc: dict[str, Any]) -> dict[str, Any]:
    doc["signature"]["value"] = base64.b64encode(b"x" * 10).decode()
    return doc


def _extra_signature_field(doc: dict[str, Any]) -> dict[str, Any]:
    doc["signature"]["alg"] = "none"
    return doc


def _signature_as_string(doc: dict[str, Any]) -> dict[str, Any]:
    doc["signature"] = doc["signature"]["value"]
    return doc


def _added_field_after_signing(doc: dict[str, Any]) -> dict[str, Any]:
    doc["contract_change"] = True
    return doc


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_drop_signature, Reason.SIGNATURE_MISSING),
        (_null_signature, Reason.SIGNATURE_MISSING),
        (_tamper, Reason.SIGNATURE_INVALID),
        (_added_field_after_signing, Reason.SIGNATURE_INVALID),
        (_other_key_same_id, Reason.SIGNATURE_INVALID),
        (_garbage_value, Reason.SIGNATURE_INVALID),
        (_short_value, Reason.SIGNATURE_INVALID),
        (_extra_signature_field, Reason.SIGNATURE_INVALID),
        (_signature_as_string, Reason.SIGNATURE_INVALID),
        (_unknown_key, Reason.UNKNOWN_KEY),
    ],
)
def test_unsigned_badly_signed_or_unknown_key_is_rejected(mutate: Any, reason: str) -> None:
    """Rejected before any download (verification is pure, so nothing else can run)."""
    assert rejected_reason(mutate(signed())) == reason


@pytest.mark.parametrize("raw", [None, [], "manifest", 42])
def test_non_object_is_schema_invalid(raw: object) -> None:
    assert rejected_reason(raw) is Reason.SCHEMA_INVALID


@pytest.mark.parametrize(
    "overrides",
    [
        {"version": 0},
        {"version": "7"},
        {"version": 7.0},
        {"version": True},
        {"size": 0},
        {"sha256": "A" * 64},
        {"sha256": "a" * 63},
        {"name": "../etc"},
        {"name": ""},
        {"created": "2026-11-25T08:00:00"},  # no UTC offset
        {"created": 1764057600},
        {"expires": "2026-11-01T00:00:00Z"},  # before created
        {"unexpected": 1},
        {"contract": {"inputs": [], "outputs": []}},
        {"contract": {"inputs": [{"name": "x", "dtype": "FP32", "shape": [1]}], "outputs": []}},
        {
            "contract": {
                "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
            }
        },
        {
            "contract": {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
            }
        },
        {
            "contract": {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1]},
                    {"name": "x", "datatype": "FP32", "shape": [1]},
                ],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
            }
        },
        {
            "golden": {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                "atol": 0.1,
            }
        },
        {"golden": {"input": [], "output": [], "atol": 0.1}},
        {"baseline": {"sha256": SHA_B}},
        {"baseline": {"sha256": SHA_B, "url": "https://models.example.net/b.json"}},  # no size
        {"baseline": {"sha256": SHA_B, "size": 2**30, "url": "https://models.example.net/b"}},
        {"schema": 1},  # a baseline needs schema 2
        {"schema": 3},
        {"contract_change": "yes"},
        {"big": "x" * 40_000},
    ],
)
def test_signed_but_schema_invalid_is_rejected(overrides: dict[str, Any]) -> None:
    """A valid signature does not make a malformed document acceptable."""
    doc = unsigned_manifest(**overrides)
    payload_sig = base64.b64encode(SIGNING_KEY.sign(canonical_json(doc))).decode()
    doc["signature"] = {"key_id": "release-2026", "value": payload_sig}
    assert rejected_reason(doc) is Reason.SCHEMA_INVALID


def test_optional_fields_may_be_absent() -> None:
    doc = unsigned_manifest()
    for optional in ("schema", "expires", "baseline", "golden"):
        del doc[optional]
    manifest = verify_manifest(sign_manifest(doc, SIGNING_KEY, "release-2026"), TRUSTED, NOW)
    assert (manifest.expires, manifest.baseline, manifest.golden) == (None, None, None)


@pytest.mark.parametrize(
    ("now", "accepted"),
    [
        (datetime(2026, 12, 25, 7, 59, 59, tzinfo=UTC), True),
        (datetime(2026, 12, 25, 8, 0, 0, tzinfo=UTC), False),
        (datetime(2027, 1, 1, tzinfo=UTC), False),
        (datetime(2026, 12, 25, 9, 0, tzinfo=UTC).astimezone(), False),  # same instant, local tz
    ],
)
def test_expired_manifest_is_rejected(now: datetime, accepted: bool) -> None:
    if accepted:
        assert verify_manifest(signed(), TRUSTED, now).version == 7
    else:
        assert rejected_reason(signed(), now) is Reason.EXPIRED


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_manifest(signed(), TRUSTED, datetime(2026, 11, 26))


def test_error_message_does_not_echo_untrusted_values() -> None:
    doc = unsigned_manifest(version="SECRET-VALUE")
    doc["signature"] = {
        "key_id": "release-2026",
        "value": base64.b64encode(SIGNING_KEY.sign(canonical_json(doc))).decode(),
    }
    with pytest.raises(ManifestRejected) as info:
        verify_manifest(doc, TRUSTED, NOW)
    assert "SECRET-VALUE" not in str(info.value)
    assert "version" in info.value.message


# --- version monotonicity ------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    version: int
    sha256: str


@pytest.mark.parametrize(
    ("version", "sha", "seen", "expected"),
    [
        (7, SHA_A, None, ReleaseStatus.NEW),
        (7, SHA_A, Seen(6, SHA_B), ReleaseStatus.NEW),
        (7, SHA_A, Seen(6, SHA_A), ReleaseStatus.NEW),
        (7, SHA_A, Seen(7, SHA_A), ReleaseStatus.SAME_RELEASE),
        (7, SHA_A, Seen(7, SHA_B), Reason.VERSION_NOT_MONOTONIC),
        (6, SHA_A, Seen(7, SHA_B), Reason.VERSION_NOT_MONOTONIC),
        (1, SHA_A, Seen(7, SHA_A), Reason.VERSION_NOT_MONOTONIC),
    ],
)
def test_check_version(
    version: int, sha: str, seen: Seen | None, expected: ReleaseStatus | Reason
) -> None:
    manifest = verify_manifest(signed(version=version, sha256=sha), TRUSTED, NOW)
    if isinstance(expected, ReleaseStatus):
        assert check_version(manifest, seen) is expected
    else:
        with pytest.raises(ManifestRejected) as info:
            check_version(manifest, seen)
        assert info.value.reason is expected


# --- keys ----------------------------------------------------------------------------------


def _b64(key: Ed25519PublicKey) -> str:
    return public_key_to_b64(key)


def test_parse_trusted_keys_reads_env_style_pairs() -> None:
    spec = (
        f" release-2026={_b64(SIGNING_KEY.public_key())};\nbackup={_b64(OTHER_KEY.public_key())},"
    )
    keys = parse_trusted_keys(spec)
    assert sorted(keys) == ["backup", "release-2026"]
    assert verify_manifest(signed(), keys, NOW).version == 7


@pytest.mark.parametrize(
    "spec",
    [
        "release-2026",
        "release-2026=not-base64!",
        f"release-2026={base64.b64encode(b'short').decode()}",
        f"bad id={_b64(SIGNING_KEY.public_key())}",
        f"a={_b64(SIGNING_KEY.public_key())},a={_b64(OTHER_KEY.public_key())}",
    ],
)
def test_parse_trusted_keys_refuses_bad_entries(spec: str) -> None:
    with pytest.raises(KeyConfigError):
        parse_trusted_keys(spec)


def test_empty_spec_trusts_nothing() -> None:
    assert parse_trusted_keys("") == {}
    with pytest.raises(ManifestRejected) as info:
        verify_manifest(signed(), {}, NOW)
    assert info.value.reason is Reason.UNKNOWN_KEY


def test_load_trusted_keys_from_pem_files_uses_the_stem_as_key_id(tmp_path: Path) -> None:
    pem = SIGNING_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "release-2026.pem").write_bytes(pem)
    keys = load_trusted_keys(
        f"backup={_b64(OTHER_KEY.public_key())}", [tmp_path / "release-2026.pem"]
    )
    assert sorted(keys) == ["backup", "release-2026"]
    assert verify_manifest(signed(), keys, NOW).version == 7


def test_load_trusted_keys_refuses_a_non_ed25519_pem(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes(
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(KeyConfigError):
        load_trusted_keys("", [tmp_path / "k.pem"])


def test_load_private_key_round_trips_a_pkcs8_pem(tmp_path: Path) -> None:
    pem = SIGNING_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "signing.pem").write_bytes(pem)
    key = load_private_key(tmp_path / "signing.pem")
    doc = sign_manifest(unsigned_manifest(), key, "release-2026")
    assert verify_manifest(doc, TRUSTED, NOW).version == 7


def test_public_key_b64_round_trip() -> None:
    key = SIGNING_KEY.public_key()
    assert public_key_from_b64(public_key_to_b64(key)) == key

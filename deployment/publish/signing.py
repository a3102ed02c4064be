"""Ed25519 publisher keys: generation, loading, and signing manifests with the agent's code.

The key id is derived from the public key (``edgeml-`` + 12 hex digits of its sha256), so a
signature always names the key that made it and no setting can disagree with the file. Rotation
is a second key: devices trust both (``EDGEML_TRUSTED_KEYS="old=…,new=…"`` or both ``.pem`` files
in ``EDGEML_TRUSTED_KEYS_DIR``) while new releases are signed with the new one; once every ring
runs a release signed by the new key, the old one is removed from the devices' settings.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.releases.manifest import (
    KeyConfigError,
    load_trusted_keys,
    private_key_from_pem,
    public_key_to_b64,
    sign_manifest,
)
from deployment import config
from deployment.errors import PublisherError, Reason
from wire.manifest import UnsignedManifest


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "edgeml-" + hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str

    def sign(self, unsigned: Mapping[str, Any] | UnsignedManifest) -> dict[str, Any]:
        return sign_manifest(unsigned, self.private, self.key_id)


@dataclass(frozen=True)
class GeneratedKey:
    key_id: str
    private_file: Path
    public_file: Path
    trusted_keys_entry: str  # the EDGEML_TRUSTED_KEYS item for devices


def generate(directory: Path) -> GeneratedKey:
    """A new key pair: ``<key_id>.key`` (PKCS#8 PEM, mode 0600) and ``<key_id>.pem`` (public).

    The private file is created with O_EXCL at mode 0600, so it is never readable by others,
    not even between creation and a chmod.
    """
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    kid = key_id(public)
    directory.mkdir(parents=True, exist_ok=True)
    private_file = directory / f"{kid}.key"
    public_file = directory / f"{kid}.pem"
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    public_file.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return GeneratedKey(kid, private_file, public_file, f"{kid}={public_key_to_b64(public)}")


def load(resolved: config.Resolved | None, environ: Mapping[str, str] = os.environ) -> SigningKey:
    """The signing key from its secret (the PEM, or the 0600 file that holds it)."""
    pem = config.secret(config.SIGNING_KEY_SECRET, resolved, environ, owner_only=True)
    try:
        private = private_key_from_pem(pem.encode("ascii"))
    except (KeyConfigError, UnicodeEncodeError) as e:
        # The key's bytes never enter the message: only what kind of problem it is.
        raise PublisherError(
            Reason.KEY_INVALID, f"{config.SIGNING_KEY_SECRET} is not an Ed25519 PEM private key"
        ) from e
    return SigningKey(private, key_id(private.public_key()))


def trusted_keys_entries(pem_files: list[Path]) -> str:
    """The ``EDGEML_TRUSTED_KEYS`` value for public key files named ``<key_id>.pem``."""

    try:
        keys = load_trusted_keys("", pem_files)
    except KeyConfigError as e:
        raise PublisherError(Reason.KEY_INVALID, f"trusted key files: {e}") from e
    if not keys:
        raise PublisherError(Reason.KEY_INVALID, "no <key_id>.pem file in the trusted keys folder")
    return ",".join(f"{kid}={public_key_to_b64(key)}" for kid, key in sorted(keys.items()))

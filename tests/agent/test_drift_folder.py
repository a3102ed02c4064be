"""A release dropped into a folder carries its baseline pack beside the model."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.releases.download import DeliveryError
from agent.releases.folder import FolderArtifacts
from agent.releases.manifest import ReleaseManifest, verify_manifest
from agent.releases.store import ModelStore
from deployment.publish.release import build_manifest
from tests.support.models import tiny_bytes

PACK = b'{"a pack": "bytes"}'
SHA = hashlib.sha256(PACK).hexdigest()


def _manifest(baseline_url: str) -> ReleaseManifest:
    key = Ed25519PrivateKey.generate()
    signed = build_manifest(
        tiny_bytes(0),
        name="m",
        version=1,
        url="https://models.example.net/m.onnx",
        key=key,
        key_id="k",
        golden_atol=None,
        baseline=(PACK, baseline_url),
    )
    return verify_manifest(signed, {"k": key.public_key()}, datetime.now(UTC))


@pytest.mark.parametrize(
    ("file_name", "url"),
    [(f"{SHA}.json", "https://x.example.net/other.json"), ("m-7.json", "https://x/m-7.json")],
)
async def test_the_pack_is_copied_by_its_digest_or_url_name(
    tmp_path: Path, file_name: str, url: str
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / file_name).write_bytes(PACK)
    store = ModelStore(tmp_path / "store")
    store.open()
    await FolderArtifacts(folder).fetch_baseline(_manifest(url), store.baseline_part(SHA))
    assert store.commit_baseline(SHA).read_bytes() == PACK


async def test_a_pack_that_differs_from_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / f"{SHA}.json").write_bytes(PACK.replace(b"a", b"b"))
    store = ModelStore(tmp_path / "store")
    store.open()
    with pytest.raises(DeliveryError) as refused:
        await FolderArtifacts(folder).fetch_baseline(
            _manifest("https://x/b.json"), store.baseline_part(SHA)
        )
    assert refused.value.reason == "hash_mismatch"

"""The audit log: a hash chain that notices changed, removed and cut-off entries."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.releases.manifest import canonical_json
from deployment.errors import PublisherError, Reason
from deployment.publish.audit import AuditLog, check_no_secret


def _log(path: Path) -> AuditLog:
    return AuditLog(path, actor="ci@test", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))


def _filled(tmp_path: Path, count: int = 4) -> AuditLog:
    log = _log(tmp_path / "audit.jsonl")
    for index in range(count):
        log.append("register", f"m:{index + 1}", "registered", sha256="a" * 64)
    return log


def test_entries_chain_and_verify(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    count, head = log.verify()
    entries = list(log.entries())
    assert count == 4
    assert head == entries[-1].hash
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert entries[0].actor == "ci@test"


def _rewrite(path: Path, change: object) -> None:
    lines = path.read_text().splitlines()
    assert callable(change)
    path.write_text("\n".join(change(lines)) + "\n")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda lines: [
                lines[0],
                lines[1].replace('"registered"', '"failed"'),
                *lines[2:],
            ],
            "entry 2 was changed",
        ),
        (lambda lines: [lines[0], *lines[2:]], "sequence broken"),
        (lambda lines: lines[:-1], "entries were removed"),
        (lambda lines: [lines[0], "not json", *lines[2:]], "line 2 is not JSON"),
    ],
    ids=["changed", "removed-middle", "cut-off-tail", "garbage"],
)
def test_verify_names_the_broken_entry(tmp_path: Path, change: object, words: str) -> None:
    log = _filled(tmp_path)
    _rewrite(log.path, change)
    with pytest.raises(PublisherError) as caught:
        log.verify()
    assert caught.value.reason == Reason.AUDIT_BROKEN
    assert words in caught.value.message


def test_a_rehashed_entry_still_breaks_the_next_link(tmp_path: Path) -> None:
    """Recomputing a changed entry's own hash does not help: the next entry names the old one."""
    log = _filled(tmp_path)
    lines = log.path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["outcome"] = "failed"
    entry["hash"] = hashlib.sha256(
        canonical_json({k: v for k, v in entry.items() if k != "hash"})
    ).hexdigest()
    lines[1] = json.dumps(entry)
    log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PublisherError, match="entry 3 does not follow entry 2"):
        log.verify()


def test_appending_to_a_broken_log_is_refused(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    _rewrite(log.path, lambda lines: lines[:-1])
    with pytest.raises(PublisherError, match="removed"):
        log.append("sign", "m:1", "signed")


@pytest.mark.parametrize(
    "value",
    [
        "HostName=h;SharedAccessKeyName=owner;SharedAccessKey=abc=",
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=xyz==",
        "https://a.blob.core.windows.net/c/b?sv=2024&sig=abc%3D",
        "-----BEGIN PRIVATE KEY-----\nMC4C\n-----END PRIVATE KEY-----",
        {"nested": ["SharedAccessSignature sr=x&sig=y"]},
    ],
)
def test_secret_like_details_are_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="secret"):
        check_no_secret({"field": value})
    log = _log(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="secret"):
        log.append("upload", "m:1", "uploaded", url=value)
    assert not log.path.exists()


def test_plain_urls_and_hashes_are_kept(tmp_path: Path) -> None:
    log = _log(tmp_path / "audit.jsonl")
    entry = log.append(
        "upload", "m:1", "uploaded", url="https://a.blob.core.windows.net/c/m/1/x.onnx"
    )
    assert entry.details["url"].endswith("x.onnx")


def test_a_crash_between_the_log_and_its_head_is_not_tampering(tmp_path: Path) -> None:
    """The head one entry behind is what a crash between the two writes leaves."""
    log = _filled(tmp_path)
    head = log.head_path.read_text()
    log.append("sign", "m:4", "signed")
    log.head_path.write_text(head)  # as if killed before the head was replaced
    assert log.verify()[0] == 5
    log.append("sign", "m:4", "signed again")
    assert log.verify()[0] == 6

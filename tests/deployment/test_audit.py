"""The audit log: a hash chain that notices changed, removed and cut-off entries."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.releases.manifest import canonical_json
from deployment.errors import PublisherError, Reason
from deployment.publish.audit import AuditLog, AuditNotWrittenError, Entry, check_no_secret
from tests.deployment.conftest import REPO, Workspace


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
    assert log.verify()[0] == 6  # the five entries and the note of the repair
    log.append("sign", "m:4", "signed again")
    assert log.verify()[0] == 7


def test_a_head_far_behind_a_valid_chain_is_repaired_and_the_repair_is_audited(
    tmp_path: Path,
) -> None:
    """What racing writers left before appends were locked: the head at seq 2 of a chain of 6."""
    log = _filled(tmp_path, count=2)
    lagging = log.head_path.read_text()
    for index in range(4):
        log.append("sign", f"m:{index}", "signed")
    log.head_path.write_text(lagging)
    count, head = log.verify()
    entries = list(log.entries())
    assert count == 7
    assert head == entries[-1].hash
    repair = entries[-1]
    assert (repair.action, repair.outcome) == ("audit.head_repaired", "repaired")
    assert dict(repair.details) == {"head_seq": 2, "chain_seq": 6}
    assert json.loads(log.head_path.read_text()) == {"seq": 7, "hash": head}


@pytest.mark.parametrize(
    "head",
    [
        {"seq": 2, "hash": "f" * 64},  # names a seq of the chain, not its entry
        {"seq": 9, "hash": "f" * 64},  # beyond the chain: entries were cut off
        ["not", "an", "object"],
    ],
    ids=["wrong-hash", "beyond", "garbage"],
)
def test_a_head_that_names_no_entry_of_the_chain_is_not_repaired(
    tmp_path: Path, head: object
) -> None:
    log = _filled(tmp_path)
    log.head_path.write_text(json.dumps(head))
    with pytest.raises(PublisherError) as caught:
        log.verify()
    assert caught.value.reason == Reason.AUDIT_BROKEN
    assert log.head_path.read_text() == json.dumps(head)


def test_a_refused_append_says_the_action_stands_but_is_not_audited(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    _rewrite(log.path, lambda lines: [lines[0], *lines[2:]])
    with pytest.raises(AuditNotWrittenError) as caught:
        log.append("register", "m:5", "registered")
    assert caught.value.reason == Reason.NOT_AUDITED
    assert "register m:5: registered, but not audited" in caught.value.message
    assert "sequence broken" in caught.value.message


_APPENDER = """
import sys
from pathlib import Path
from deployment.publish.audit import AuditLog
log = AuditLog(Path(sys.argv[1]), actor=sys.argv[2])
for index in range(int(sys.argv[3])):
    log.append("sign", f"m:{index}", "signed", writer=sys.argv[2])
"""


def test_two_processes_appending_at_once_keep_every_entry_and_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), name, "100"], cwd=REPO)
        for name in ("one", "two")
    ]
    assert [writer.wait(timeout=100) for writer in writers] == [0, 0]
    log = _log(path)
    count, head = log.verify()
    assert count == 200
    entries = list(log.entries())
    assert sorted(e.actor for e in entries) == ["one"] * 100 + ["two"] * 100
    assert json.loads(log.head_path.read_text()) == {"seq": 200, "hash": head}


# Each appender is a list of pauses (ms) that its clock sleeps: the clock is read between
# reading the chain and writing, so a pause holds that writer inside the critical section.
_pauses = st.lists(st.sampled_from([0.0, 0.0, 0.2, 1.0]), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(first=_pauses, second=_pauses, verifying=st.booleans())
def test_any_interleaving_of_two_appenders_keeps_every_acknowledged_entry(
    first: list[float], second: list[float], verifying: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.jsonl"
        acknowledged: list[Entry] = []
        failures: list[BaseException] = []

        def appender(name: str, pauses: list[float]) -> None:
            remaining = iter(pauses)

            def clock() -> datetime:
                time.sleep(next(remaining, 0.0) / 1000)
                return datetime(2026, 1, 1, tzinfo=UTC)

            log = AuditLog(path, actor=name, clock=clock)  # one instance per writer
            try:
                for index in range(len(pauses)):
                    acknowledged.append(log.append("sign", f"{name}:{index}", "signed"))
                    if verifying:
                        log.verify()
            except BaseException as e:  # handed to the test thread, which asserts none
                failures.append(e)

        threads = [
            threading.Thread(target=appender, args=("one", first)),
            threading.Thread(target=appender, args=("two", second)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert failures == []
        log = _log(path)
        count, _ = log.verify()
        stored = {(e.seq, e.hash) for e in log.entries()}
        assert count == len(first) + len(second)
        assert {(e.seq, e.hash) for e in acknowledged} == stored


def test_a_command_whose_entry_is_refused_says_it_was_done_but_not_audited(
    workspace: Workspace, tiny_file: Path
) -> None:
    first = workspace.cli(
        "register", str(tiny_file), "--name", "unaudited", "--metrics", str(workspace.metrics)
    )
    assert first.code == 0, first.err
    workspace.audit.with_name("audit.jsonl.head").write_text('{"seq": 7, "hash": "0"}\n')
    result = workspace.cli(
        "register", str(tiny_file), "--name", "unaudited", "--metrics", str(workspace.metrics)
    )
    assert result.code == 1
    assert result.err.startswith("edgeml: error [not_audited]: register unaudited:")
    assert ": registered, but not audited (the audit log does not end at its head" in result.err

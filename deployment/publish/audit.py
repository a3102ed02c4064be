"""The append-only, hash-chained audit log: who did what, when, and how it ended.

One JSON object per line; each carries the hash of the previous entry and its own hash over the
canonical JSON of everything else, so changing or removing an entry breaks the chain at that
point. A head file beside the log keeps the last sequence number and hash, so cutting entries
off the end is detected too (replacing both files consistently needs write access to both and
is what an external anchor, such as the head hash pasted in a CI log, guards against).

Details are checked before they are written: a value that looks like a secret (an account or
SAS key, a signature, a private key) is refused rather than stored.

Several processes may append at once (a release, the retraining controller, an operator): an
append holds an exclusive ``flock`` on ``path``.lock from reading the chain's tail to replacing
the head, so no two appends ever chain to the same entry. A head that names an entry of a valid
chain that is not the last (a writer killed between the log and its head) is moved to the end
and the repair is itself an audit entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from agent.releases.manifest import canonical_json
from deployment.errors import PublisherError, Reason

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
HEAD_REPAIRED = "audit.head_repaired"
ACTOR_VARIABLE = "PUBLISHER_ACTOR"

# What a secret looks like when it leaks into a detail: refuse, never store.
_SECRET_PATTERNS = (
    re.compile(r"(?i)SharedAccessKey\s*="),
    re.compile(r"(?i)AccountKey\s*="),
    re.compile(r"(?i)[?&]sig="),
    re.compile(r"(?i)SharedAccessSignature\s"),
    re.compile(r"PRIVATE KEY-----"),
)


def default_actor(environ: Mapping[str, str] = os.environ) -> str:
    actor = environ.get(ACTOR_VARIABLE)
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _entry_hash(entry: Mapping[str, Any]) -> str:
    unhashed = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(unhashed)).hexdigest()


def check_no_secret(value: object, where: str = "details") -> None:
    """Raise if any string inside ``value`` looks like a secret (pure)."""
    if isinstance(value, str):
        for pattern in _SECRET_PATTERNS:
            if pattern.search(value):
                raise ValueError(f"refusing to audit a secret-like value in {where}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_no_secret(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for item in value:
            check_no_secret(item, where)


@dataclass(frozen=True)
class Entry:
    seq: int
    time: str
    actor: str
    action: str
    subject: str
    outcome: str
    details: Mapping[str, Any]
    hash: str


class AuditNotWrittenError(PublisherError):
    """An action that was done (or decided) but could not be recorded: the message says so."""

    def __init__(self, action: str, subject: str, outcome: str, why: str) -> None:
        super().__init__(
            Reason.NOT_AUDITED,
            f"{action} {subject}: {outcome}, but not audited ({why}); "
            "fix the log (edgeml audit verify names the problem), the action stands",
        )
        self.action = action
        self.subject = subject
        self.outcome = outcome


class AuditLog:
    """Appends to ``path`` (and ``path``.head); reads verify the chain."""

    def __init__(
        self,
        path: Path,
        *,
        actor: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self.head_path = path.with_name(path.name + ".head")
        self.lock_path = path.with_name(path.name + ".lock")
        self._actor = actor or default_actor()
        self._clock = clock

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        """``flock`` on a file beside the log, never on the log or its head: the head is
        replaced by rename, and a lock on a replaced file would guard nothing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(descriptor, operation)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def append(self, action: str, subject: str, outcome: str, **details: Any) -> Entry:
        """Record one entry; raises :class:`AuditNotWrittenError` when the log refuses it."""
        check_no_secret(details)
        check_no_secret(subject, "subject")
        with self._locked(fcntl.LOCK_EX):
            try:
                entries = self._read()
                entries = self._repair_head(entries)
            except PublisherError as e:
                raise AuditNotWrittenError(action, subject, outcome, e.message) from e
            return self._write(entries, action, subject, outcome, details)

    def _write(
        self,
        entries: list[Entry],
        action: str,
        subject: str,
        outcome: str,
        details: Mapping[str, Any],
    ) -> Entry:
        """Append after ``entries`` (read under the lock this caller holds), then the head."""
        last = entries[-1] if entries else None
        entry: dict[str, Any] = {
            "seq": (last.seq + 1) if last else 1,
            "time": self._clock().isoformat(),
            "actor": self._actor,
            "action": action,
            "subject": subject,
            "outcome": outcome,
            "details": json.loads(canonical_json(details)),
            "prev": last.hash if last else GENESIS,
        }
        entry["hash"] = _entry_hash(entry)
        line = canonical_json(entry) + b"\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self._write_head(entry["seq"], entry["hash"])
        written = _to_entry(entry)
        entries.append(written)
        return written

    def _write_head(self, seq: int, digest: str) -> None:
        head = self.head_path.with_name(self.head_path.name + ".tmp")
        head.write_text(json.dumps({"seq": seq, "hash": digest}) + "\n")
        os.replace(head, self.head_path)

    def _repair_head(self, entries: list[Entry]) -> list[Entry]:
        """Check the head against the chain (held under the exclusive lock); a head that names
        an earlier entry of the chain is moved to its end, and the repair recorded."""
        last = entries[-1] if entries else None
        if not self.head_path.exists():
            if last is not None:
                raise PublisherError(Reason.AUDIT_BROKEN, f"{self.head_path} is missing")
            return entries
        head = _read_head(self.head_path)
        if last is not None and head == {"seq": last.seq, "hash": last.hash}:
            return entries
        lagging = lagging_head(entries, head)
        if lagging is None:
            raise PublisherError(
                Reason.AUDIT_BROKEN,
                f"the audit log does not end at its head (seq {head.get('seq')}): "
                "entries were removed or the head was changed",
            )
        assert last is not None  # lagging_head only matches an entry before the last
        # A writer was killed (or, before the lock, raced) between the log and its head: the
        # entries after the head chain correctly, so they stand; say that the head moved.
        log.warning("audit_head_repaired", path=str(self.path), head=lagging, chain=last.seq)
        self._write_head(last.seq, last.hash)
        repair = {"head_seq": lagging, "chain_seq": last.seq}
        self._write(entries, HEAD_REPAIRED, "audit", "repaired", repair)
        return entries

    def _read(self) -> list[Entry]:
        """Every entry, the chain checked; the caller holds a lock, so no append is half-done."""
        if not self.path.exists():
            return []
        return list(_chain(self.path.read_bytes().splitlines(keepends=True)))

    def entries(self) -> Iterator[Entry]:
        """Every entry, checking the chain as it goes; raises at the first broken link."""
        if not self.path.exists():
            return  # nothing to read, and no lock file or folder made for reading nothing
        with self._locked(fcntl.LOCK_SH):
            data = self.path.read_bytes() if self.path.exists() else b""
        yield from _chain(data.splitlines(keepends=True))

    def verify(self) -> tuple[int, str]:
        """(entries, head hash) of an intact log, repairing a lagging head first; raises
        :class:`PublisherError` otherwise."""
        with self._locked(fcntl.LOCK_EX):
            entries = self._repair_head(self._read())
        return (len(entries), entries[-1].hash if entries else GENESIS)


def lagging_head(entries: list[Entry], head: Mapping[str, Any]) -> int | None:
    """The seq of the entry before the last that ``head`` names exactly, else None (pure)."""
    seq = head.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < len(entries):
        return None
    return seq if entries[seq - 1].hash == head.get("hash") else None


def _read_head(path: Path) -> dict[str, Any]:
    try:
        head = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PublisherError(Reason.AUDIT_BROKEN, f"{path} is unreadable ({e})") from e
    if not isinstance(head, dict):
        raise PublisherError(Reason.AUDIT_BROKEN, f"{path} is not a JSON object")
    return head


def _chain(lines: list[bytes]) -> Iterator[Entry]:
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise PublisherError(Reason.AUDIT_BROKEN, f"line {number} is not JSON") from e
        if not isinstance(raw, dict) or raw.get("seq") != number:
            raise PublisherError(
                Reason.AUDIT_BROKEN, f"line {number}: sequence broken (entry removed?)"
            )
        if raw.get("prev") != prev:
            raise PublisherError(
                Reason.AUDIT_BROKEN, f"entry {number} does not follow entry {number - 1}"
            )
        if raw.get("hash") != _entry_hash(raw):
            raise PublisherError(Reason.AUDIT_BROKEN, f"entry {number} was changed")
        prev = raw["hash"]
        yield _to_entry(raw)


def _to_entry(raw: Mapping[str, Any]) -> Entry:
    return Entry(
        seq=raw["seq"],
        time=raw["time"],
        actor=raw["actor"],
        action=raw["action"],
        subject=raw["subject"],
        outcome=raw["outcome"],
        details=raw["details"],
        hash=raw["hash"],
    )

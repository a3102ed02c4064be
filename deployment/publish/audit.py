"""The append-only, hash-chained audit log: who did what, when, and how it ended.

One JSON object per line; each carries the hash of the previous entry and its own hash over the
canonical JSON of everything else, so changing or removing an entry breaks the chain at that
point. A head file beside the log keeps the last sequence number and hash, so cutting entries
off the end is detected too (replacing both files consistently needs write access to both and
is what an external anchor, such as the head hash pasted in a CI log, guards against).

Details are checked before they are written: a value that looks like a secret (an account or
SAS key, a signature, a private key) is refused rather than stored.
"""

from __future__ import annotations

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

from agent.releases.manifest import canonical_json
from deployment.errors import PublisherError, Reason

GENESIS = "0" * 64
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
        self._actor = actor or default_actor()
        self._clock = clock

    def append(self, action: str, subject: str, outcome: str, **details: Any) -> Entry:
        check_no_secret(details)
        check_no_secret(subject, "subject")
        entries = list(self.entries())
        last = entries[-1] if entries else None
        self._check_head(entries)
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = canonical_json(entry) + b"\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        head = self.head_path.with_name(self.head_path.name + ".tmp")
        head.write_text(json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n")
        os.replace(head, self.head_path)
        return _to_entry(entry)

    def _check_head(self, entries: list[Entry]) -> None:
        """The head names the last entry, or the one before it: an append writes the log
        first and the head second, so a crash between the two leaves the head one behind."""
        last = entries[-1] if entries else None
        if not self.head_path.exists():
            if last is not None:
                raise PublisherError(Reason.AUDIT_BROKEN, f"{self.head_path} is missing")
            return
        head = json.loads(self.head_path.read_text())
        candidates = [{"seq": e.seq, "hash": e.hash} for e in entries[-2:]]
        if head not in candidates:
            raise PublisherError(
                Reason.AUDIT_BROKEN,
                f"the audit log does not end at its head (seq {head.get('seq')}): "
                "entries were removed or the head was changed",
            )

    def entries(self) -> Iterator[Entry]:
        """Every entry, checking the chain as it goes; raises at the first broken link."""
        if not self.path.exists():
            return
        prev = GENESIS
        with self.path.open("rb") as file:
            for number, line in enumerate(file, start=1):
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

    def verify(self) -> tuple[int, str]:
        """(entries, head hash) of an intact log; raises :class:`PublisherError` otherwise."""
        entries = list(self.entries())
        self._check_head(entries)
        return (len(entries), entries[-1].hash if entries else GENESIS)


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

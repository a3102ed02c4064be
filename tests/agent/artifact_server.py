"""Test fixtures for verified model delivery: a fault-injecting HTTPS artifact server on loopback,
a test CA with good, self-signed and expired server certificates, and a full-disk file opener.

Registered from ``tests/agent/conftest.py``; the fixtures live here so that other suites can
add their own fixtures to that conftest without touching these.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.store import WritableFile

# --- a disk that fills up ------------------------------------------------------------------


class _BudgetFile:
    """A real file that raises ENOSPC once its opener's byte budget is spent."""

    def __init__(self, inner: WritableFile, owner: FullDisk) -> None:
        self._inner = inner
        self._owner = owner

    def write(self, data: bytes, /) -> int:
        room = self._owner.budget - self._owner.written
        if len(data) > room:
            # Like a real full disk: what fits is written, then the write fails.
            if room > 0:
                self._inner.write(data[:room])
                self._owner.written += room
            raise OSError(errno.ENOSPC, "No space left on device")
        self._owner.written += len(data)
        return self._inner.write(data)

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def close(self) -> None:
        self._inner.close()


@dataclass
class FullDisk:
    """An ``Opener`` for :class:`agent.store.ModelStore` whose files share ``budget`` bytes."""

    budget: int
    written: int = 0
    opened: list[str] = field(default_factory=list)

    def __call__(self, path: Path, mode: Literal["wb", "ab"]) -> WritableFile:
        self.opened.append(path.name)
        return _BudgetFile(path.open(mode), self)

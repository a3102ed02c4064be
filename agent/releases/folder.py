"""A second model source: signed manifests and their artifacts dropped into a folder.

For air-gapped installs and files delivered by other update agents, and for images that ship
an initial model so a device serves from first boot. Releases go through the same pipeline as
twin releases (signature, version, size, sha256, load, contract, golden, swap).

Rules that keep partial writes out:
* only `*.manifest.json` files are acted on, and only once the folder has been quiet for
  `debounce_s` (a publisher writes the artifact first, the manifest last);
* the artifact is copied into the store and its sha256 checked like a download: a file still
  being written fails the check, and is retried when the folder changes again;
* the artifact is `<sha256>.onnx`, or the file name at the end of the manifest's URL, in the
  folder itself: a plain name, a regular file, not a link.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

import structlog
from pydantic import Field
from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from agent.config import Section
from agent.observation.metrics import LoopFailures
from agent.releases.download import DeliveryError
from agent.releases.lifecycle import ModelState
from agent.releases.manifest import (
    MAX_MANIFEST_BYTES,
    ManifestRejected,
    ReleaseManifest,
    load_manifest_json,
)
from agent.releases.store import PartFile, is_disk_full
from agent.releases.swap import ModelManager
from wire.reasons import Reason

log = structlog.get_logger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
_CHUNK = 1 << 20
# Reads are not changes. Every scan opens the manifests (and a retry the artifact): waking on
# those would rescan forever and retry a failed release without the folder having changed.
_READ_EVENTS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})


@dataclass(frozen=True, slots=True)
class FolderArtifacts:
    """`ArtifactSource` reading the artifact next to the manifest."""

    folder: Path

    def candidates(self, manifest: ReleaseManifest) -> list[Path]:
        return self._candidates(f"{manifest.sha256}.onnx", manifest.url)

    def _candidates(self, own_name: str, url: str) -> list[Path]:
        names = [own_name]
        url_name = PurePosixPath(urlsplit(url).path).name
        if url_name and not url_name.startswith(".") and url_name not in names:
            names.append(url_name)
        return [self.folder / name for name in names]

    async def fetch(self, manifest: ReleaseManifest, part: PartFile) -> None:
        candidates = self.candidates(manifest)
        await asyncio.to_thread(self._copy, candidates, manifest.sha256, manifest.size, part)

    async def fetch_baseline(self, manifest: ReleaseManifest, part: PartFile) -> None:
        """The baseline pack is `<sha256>.json`, or the file name at the end of its URL."""
        baseline = manifest.baseline
        if baseline is None:
            raise ValueError(f"release {manifest.name} {manifest.version} has no baseline")
        candidates = self._candidates(f"{baseline.sha256}.json", baseline.url)
        await asyncio.to_thread(self._copy, candidates, baseline.sha256, baseline.size, part)

    def _copy(self, candidates: list[Path], sha256: str, size: int, part: PartFile) -> None:
        for candidate in candidates:
            try:
                info = candidate.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode):  # a link could point anywhere on the device
                raise DeliveryError(Reason.URL_REJECTED, f"{candidate.name} is not a regular file")
            self._copy_file(candidate, sha256, size, part)
            return
        raise DeliveryError(
            Reason.FETCH_FAILED,
            f"no artifact {' or '.join(c.name for c in candidates)} in the folder",
        )

    @staticmethod
    def _copy_file(source: Path, sha256: str, size: int, part: PartFile) -> None:
        digest = hashlib.sha256()
        copied = 0
        try:
            with _open_regular(source) as reader:
                sink = part.open(append=False)
                try:
                    while chunk := reader.read(_CHUNK):
                        copied += len(chunk)
                        if copied > size:
                            raise DeliveryError(
                                Reason.SIZE_MISMATCH,
                                f"{source.name} is longer than {size} bytes",
                            )
                        digest.update(chunk)
                        sink.write(chunk)
                    sink.flush()
                    os.fsync(sink.fileno())
                finally:
                    sink.close()
        except DeliveryError:
            part.remove()
            raise
        except OSError as error:
            part.remove()
            reason = Reason.DISK_FULL if is_disk_full(error) else Reason.FETCH_FAILED
            raise DeliveryError(reason, f"copying {source.name}: {error.strerror}") from error
        if copied != size:
            part.remove()
            raise DeliveryError(Reason.SIZE_MISMATCH, f"{source.name} has {copied} of {size} bytes")
        if digest.hexdigest() != sha256:
            part.remove()
            raise DeliveryError(Reason.HASH_MISMATCH, f"{source.name} sha256 differs")


class _Forward(FileSystemEventHandler):
    """Runs on watchdog's observer thread: only hands a wake-up to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, changed: asyncio.Event) -> None:
        self._loop = loop
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _READ_EVENTS:
            self._loop.call_soon_threadsafe(self._changed.set)


class FolderSettings(Section):
    """The release folder (`EDGEML_WATCH_DIR`), off unless set."""

    watch_dir: Path | None = None
    watch_debounce_s: float = Field(0.5, gt=0.0, le=60.0)


class FolderSource:
    """Service: scans the folder at start, then again each time it settles after a change."""

    def __init__(
        self,
        folder: Path,
        manager: ModelManager,
        *,
        debounce_s: float,
        failures: LoopFailures | None = None,
    ) -> None:
        self._failures = failures or LoopFailures()
        self.name = "model-folder"
        self._folder = folder
        self._manager = manager
        self._debounce_s = debounce_s
        self._artifacts = FolderArtifacts(folder)
        self._changed = asyncio.Event()
        self._observer: BaseObserver | None = None
        # Manifest file -> (content digest, outcome) of its last submission.
        self._submitted: dict[Path, tuple[str, ModelState]] = {}

    async def start(self) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        observer: BaseObserver = Observer()
        observer.schedule(_Forward(asyncio.get_running_loop(), self._changed), str(self._folder))
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._changed.set()  # the first scan: an image may ship an initial model here

    async def run(self) -> None:
        await self._manager.restored.wait()
        while True:
            await self._changed.wait()
            # Debounce: wait until the folder has been quiet for a whole period.
            while True:
                self._changed.clear()
                try:
                    async with asyncio.timeout(self._debounce_s):
                        await self._changed.wait()
                except TimeoutError:
                    break
            await self.scan()

    async def scan(self) -> None:
        for path in sorted(self._folder.glob(f"*{MANIFEST_SUFFIX}")):
            try:
                await self._scan_one(path)
            except Exception:  # one file must not keep the others, or the next scan, away
                self._failures.record("folder", file=path.name[:128])

    async def _scan_one(self, path: Path) -> None:
        document = await asyncio.to_thread(_read_manifest, path)
        if document is None:
            return
        raw, digest = document
        if self._manager.is_superseded(raw):
            return  # e.g. the image's initial model after the twin delivered newer ones
        previous = self._submitted.get(path)
        # A release already submitted is retried only if it failed: its artifact may
        # have been incomplete, and the folder has changed since.
        if previous is not None and previous[0] == digest and previous[1] != ModelState.FAILED:
            return
        status = self._manager.submit(raw, artifacts=self._artifacts)
        await self._manager.wait_idle()
        final = self._manager.statuses.get(status.name, status)
        self._submitted[path] = (digest, final.state)
        log.info("folder_release", file=path.name, state=final.state, reason=final.reason)

    async def stop(self, grace_s: float) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, grace_s)


def _open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file, checked on the open descriptor.

    O_NOFOLLOW: the name must not have become a link since it was listed; O_NONBLOCK: a FIFO
    swapped in cannot block the reader (it is then refused by the fstat check).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path.name))
    return os.fdopen(fd, "rb")


def _read_manifest(path: Path) -> tuple[object, str] | None:
    """The parsed manifest and a digest of its bytes; None while it is unreadable."""
    try:
        with _open_regular(path) as reader:
            data = reader.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EINVAL):  # a link, a FIFO, a directory...
            log.warning("folder_manifest_refused", file=path.name, error=error.strerror)
        else:
            log.warning("folder_manifest_unreadable", file=path.name, error=str(error))
        return None
    if len(data) > MAX_MANIFEST_BYTES:
        log.warning("folder_manifest_refused", file=path.name, size=len(data))
        return None
    try:
        return load_manifest_json(data), hashlib.sha256(data).hexdigest()
    except ManifestRejected as error:
        # Most often a manifest still being written: the next change triggers a new scan.
        log.warning("folder_manifest_unreadable", file=path.name, error=error.message)
        return None

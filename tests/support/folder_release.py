"""A signed release as a publisher drops it into the agent's watched folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FolderRelease:
    model: bytes
    manifest: dict[str, Any]
    features: int

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    def drop(self, folder: Path, manifest_name: str = "m.manifest.json") -> None:
        """As the folder's rules ask: the artifact first, then the manifest, renamed into place
        (over a previous one of the same name) so the agent never reads half of it."""
        (folder / f"{self.sha256}.onnx").write_bytes(self.model)
        temp = folder / f"{manifest_name}.tmp"
        temp.write_text(json.dumps(self.manifest))
        temp.rename(folder / manifest_name)

"""Reported sections as the twin shows them, for assertions on the exact JSON."""

from __future__ import annotations

from typing import Any

from wire.reported import TwinModel, to_twin


def twin(section: TwinModel | None) -> dict[str, Any] | None:
    return None if section is None else to_twin(section)

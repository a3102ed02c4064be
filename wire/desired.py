"""The agent's section of the module twin's desired properties, as the device parses it.

`models` maps a model name to its signed release manifest (`model` is the shorthand for one);
`drift` tunes drift watching; `telemetry` its cadence. Whoever writes a desired document (the
base deployment, a ring's layered deployment, a test) writes what these models accept.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from wire.base import WireModel


class TelemetrySettings(WireModel):
    """The twin's `telemetry` section."""

    interval_s: float = Field(60.0, ge=1.0, le=86400.0)
    enabled: bool = True


class DriftSettings(WireModel):
    """The twin's ``drift`` section (every field optional; these are the defaults)."""

    enabled: bool = True
    window_rows: int = Field(100, ge=2, le=100_000)
    window_seconds: float = Field(300.0, gt=0, le=86_400)
    sample_every: int = Field(1, ge=1, le=1_000_000)  # the smallest k of 1-in-k sampling
    max_sampled_per_second: float = Field(100.0, gt=0, le=1_000_000)
    # Rows kept from one sampled request, evenly spread: a big batch costs no more than this.
    max_rows_per_request: int = Field(8, ge=1, le=4096)
    features: tuple[str, ...] | None = Field(None, max_length=256)  # None: every feature
    threshold: float | None = Field(None, gt=0, le=1_000)  # overrides the calibrated CUSUM h
    max_feature_gauges: int = Field(8, ge=0, le=64)
    max_profile_features: int = Field(32, ge=1, le=256)
    # IoT Hub bills device-to-cloud messages per 4 KB: a profile stays within one unit.
    max_profile_bytes: int = Field(4000, ge=512, le=250_000)


class DesiredState(WireModel):
    """The agent's section of the module twin's desired properties.

    `models` maps a model name to its signed release manifest; `model` is the shorthand for
    one release (`{"model": m}` means `{"models": {m.name: m}}`); a document uses one or the
    other. Manifests stay plain documents: their own signatures cover them, and the model
    manager verifies them (a typed copy could not be checked against the signature).
    `drift` tunes drift watching (window, sampling, features, threshold), strictly typed.
    """

    models: dict[str, dict[str, Any]] | None = None
    model: dict[str, Any] | None = None
    drift: DriftSettings = DriftSettings()  # frozen: one shared default is safe
    telemetry: TelemetrySettings = TelemetrySettings()  # frozen: one shared default is safe

    def releases(self) -> dict[str, dict[str, Any]]:
        """Desired manifests by the name they are desired under (the map key, or for the
        shorthand the manifest's own `name`); an entry whose manifest names another model
        is the adapter's to refuse."""
        if self.model is not None:
            name = self.model.get("name")
            return {name if isinstance(name, str) else "?": self.model}
        return dict(self.models or {})

    def names(self) -> frozenset[str] | None:
        """The model names this document wants served; None when it cannot say (a `model`
        shorthand whose manifest names no model), and then no model may be removed for it."""
        if self.model is not None:
            name = self.model.get("name")
            return frozenset({name}) if isinstance(name, str) else None
        return frozenset(self.models or {})

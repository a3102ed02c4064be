"""A seeded machine-condition data set from six plant sensors, and the sensor faults that drift it.

The example pipeline trains on it and the demo's sensors stream it, so the whole loop runs
offline; a seed makes every draw identical. Classes: 0 normal, 1 bearing wear (vibration
rises), 2 overheating (temperature and current rise). The classes overlap on purpose, so
accuracy is high but not perfect and a drifted sensor visibly costs accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FEATURES = (
    "vibration_rms_mm_s",
    "vibration_peak_mm_s",
    "temperature_c",
    "current_a",
    "pressure_kpa",
    "speed_rpm",
)
CLASSES = ("normal", "bearing_wear", "overheating")
CLASS_PRIOR = (0.6, 0.2, 0.2)

# Per class: mean and spread of each feature, in FEATURES order.
_MEANS = np.array(
    [
        [2.0, 5.5, 60.0, 12.0, 300.0, 1480.0],
        [3.4, 9.5, 63.0, 12.6, 298.0, 1470.0],
        [2.2, 6.0, 74.0, 14.2, 305.0, 1475.0],
    ]
)
_SPREADS = np.array(
    [
        [0.5, 1.4, 4.0, 0.8, 8.0, 12.0],
        [0.7, 2.0, 4.5, 0.9, 8.0, 14.0],
        [0.5, 1.5, 5.0, 1.0, 9.0, 12.0],
    ]
)


@dataclass(frozen=True)
class SensorFault:
    """How a sensor's readings depart from the truth: `reading = truth * gain + offset + noise`.

    `stuck` replaces a feature by a constant, as a failed transmitter does. Features are named.
    """

    gain: dict[str, float] = field(default_factory=dict)
    offset: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)
    stuck: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in (self.gain, self.offset, self.noise, self.stuck):
            unknown = sorted(set(part) - set(FEATURES))
            if unknown:
                raise ValueError(f"unknown sensor feature {unknown[0]!r}; known: {FEATURES}")

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = x.copy()
        for name, value in self.gain.items():
            out[:, FEATURES.index(name)] *= value
        for name, value in self.offset.items():
            out[:, FEATURES.index(name)] += value
        for name, value in self.noise.items():
            column = FEATURES.index(name)
            out[:, column] += rng.normal(0.0, value, size=len(out))
        for name, value in self.stuck.items():
            out[:, FEATURES.index(name)] = value
        return out


# The demo's drift: the temperature transmitter is recalibrated wrongly (+9 °C) and the
# vibration probe loosens (gain 1.3). A model trained before it mistakes normal machines for
# overheating ones; a model retrained on labelled data from after it learns the new scale.
RECALIBRATED = SensorFault(gain={"vibration_rms_mm_s": 1.3}, offset={"temperature_c": 9.0})


def generate(
    rows: int, *, seed: int, fault: SensorFault | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`rows` readings (float32, FEATURES order) and their true classes (int64)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASSES), size=rows, p=CLASS_PRIOR).astype(np.int64)
    x = _MEANS[labels] + rng.standard_normal((rows, len(FEATURES))) * _SPREADS[labels]
    # Peak vibration follows the RMS (crest factor about 2.8), as on a real machine.
    x[:, 1] = x[:, 0] * 2.8 + rng.normal(0.0, 0.6, size=rows)
    if fault is not None:
        x = fault.apply(x, rng)
    return x.astype(np.float32), labels

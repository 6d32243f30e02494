"""Thresholds of the static verdicts, with their documented defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# |gamma| and |beta| both below this make an "abnormal affine pair" (Feng et al. 2023). The paper's
# main per-layer ratio uses 1e-10; other figures use 2e-5 and 1e-40.
ABNORMAL_PRESETS = {"paper": 1e-10, "loose": 2e-5, "strict": 1e-40}


@dataclass(frozen=True)
class Thresholds:
    dead_z: float = -3.0  # dead when z = beta / s is below this and an activation follows
    abnormal: float = ABNORMAL_PRESETS["paper"]  # abnormal affine pair: |gamma| < t and |beta| < t
    constant_scale: float = 1e-3  # constant channel: effective scale s below this
    low_gain: float = 1e-2  # low gain: |gamma| below this
    collapsed_filter: float = 1e-6  # collapsed filter: norm below this times the layer's median

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value):
                from avdiag.errors import UsageError

                raise UsageError(f"threshold {name} must be a finite number, got {value}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeThresholds:
    dead_rate: float = 1e-3  # measured dead: fires at <= this fraction of positions (or constant and ~0)
    rare_rate: float = 0.05  # rarely active: fires at <= this fraction (and is not dead)
    constant_std: float = 1e-3  # measured constant: BN output std below this

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)

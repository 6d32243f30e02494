"""Measured verdicts from a probe run, side by side with the static prediction."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avdiag.measure.probe import STD_VERDICTS, ChannelActivity, ProbeThresholds
from avdiag.measure.static import LayerVerdicts, _floats, _idx


@dataclass
class MeasuredLayer:
    activity: ChannelActivity
    dead: list[int]  # fires at <= dead_rate of positions (only where the BN feeds an activation)
    rarely_active: list[int]
    constant: list[int]
    predicted: list[int]  # the static z-criterion's dead set (dead or possibly dead)
    nonfinite: list[int] = field(default_factory=list)  # produced inf or NaN on the data: never dead
    dead_by_std: list[int] = field(default_factory=list)  # dead only through the constant-and-~0 rule

    @property
    def predicted_only(self) -> list[int]:
        return sorted(set(self.predicted) - set(self.dead))

    @property
    def measured_only(self) -> list[int]:
        return sorted(set(self.dead) - set(self.predicted))

    def to_dict(self) -> dict:
        return {
            "measured_dead_channels": self.dead,
            "rarely_active_channels": self.rarely_active,
            "measured_constant_channels": self.constant,
            "measured_nonfinite_channels": self.nonfinite,
            "predicted_not_measured": self.predicted_only,
            "measured_not_predicted": self.measured_only,
            "positions_seen": self.activity.positions,
            "fire_rate": _floats(self.activity.fire_rate),
            "output_mean": _floats(self.activity.mean),
            "output_std": _floats(self.activity.std),
            "output_max": _floats(self.activity.max),
            "nonfinite_rate": _floats(self.activity.nonfinite_rate),
        }


def judge_activity(static: LayerVerdicts, activity: ChannelActivity, t: ProbeThresholds) -> MeasuredLayer:
    """The measured verdicts of one layer. A channel with any inf or NaN output is its own verdict
    (``nonfinite``): NaN never exceeds a threshold, so its fire rate would otherwise call it dead."""
    rate = activity.fire_rate
    can_fire = static.layer.feeds_activation != "no"
    nonfinite = activity.nonfinite_count > 0
    constant = (activity.std < t.constant_std) & ~nonfinite
    # A constant channel whose largest output is ~0 passes nothing on even when it is "positive".
    by_std = constant & (activity.max <= t.constant_std) & ~(rate <= t.dead_rate)
    silent = ((rate <= t.dead_rate) | by_std) & ~nonfinite
    dead = silent if can_fire else np.zeros_like(rate, dtype=bool)
    rare = (rate <= t.rare_rate) & ~dead & ~nonfinite if can_fire else np.zeros_like(dead)
    predicted = sorted(set(static.dead) | set(static.possibly_dead))
    return MeasuredLayer(activity, _idx(dead), _idx(rare), _idx(constant), predicted, _idx(nonfinite),
                         _idx(by_std & dead))


def approximate_verdicts(amp: bool, layers: list[MeasuredLayer]) -> list[str]:
    """The measured verdicts a run under autocast makes approximate: the std-based ones, and the dead
    verdict when some channel is dead only through its (std-based) constant-and-~0 rule."""
    if not amp:
        return []
    extra = ["measured_dead_channels"] if any(m.dead_by_std for m in layers) else []
    return [*STD_VERDICTS, *extra]


@dataclass
class Agreement:
    """How well the static z-criterion predicted the measured dead set."""

    true_positive: int
    false_positive: int
    false_negative: int

    @property
    def precision(self) -> float | None:
        n = self.true_positive + self.false_positive
        return self.true_positive / n if n else None

    @property
    def recall(self) -> float | None:
        n = self.true_positive + self.false_negative
        return self.true_positive / n if n else None

    def to_dict(self) -> dict:
        return {"true_positive": self.true_positive, "false_positive": self.false_positive,
                "false_negative": self.false_negative, "precision": self.precision, "recall": self.recall}


def agreement(layers: list[MeasuredLayer]) -> Agreement:
    tp = sum(len(set(m.predicted) & set(m.dead)) for m in layers)
    fp = sum(len(m.predicted_only) for m in layers)
    fn = sum(len(m.measured_only) for m in layers)
    return Agreement(tp, fp, fn)


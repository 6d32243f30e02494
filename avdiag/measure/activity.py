"""Measured verdicts from a probe run, side by side with the static prediction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avdiag.measure.probe import ChannelActivity, ProbeThresholds
from avdiag.measure.static import LayerVerdicts, _floats, _idx


@dataclass
class MeasuredLayer:
    activity: ChannelActivity
    dead: list[int]  # fires at <= dead_rate of positions (only where the BN feeds an activation)
    rarely_active: list[int]
    constant: list[int]
    predicted: list[int]  # the static z-criterion's dead set (dead or possibly dead)

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
            "predicted_not_measured": self.predicted_only,
            "measured_not_predicted": self.measured_only,
            "positions_seen": self.activity.positions,
            "fire_rate": _floats(self.activity.fire_rate),
            "output_mean": _floats(self.activity.mean),
            "output_std": _floats(self.activity.std),
            "output_max": _floats(self.activity.max),
        }


def judge_activity(static: LayerVerdicts, activity: ChannelActivity, t: ProbeThresholds) -> MeasuredLayer:
    rate = activity.fire_rate
    can_fire = static.layer.feeds_activation != "no"
    constant = activity.std < t.constant_std
    # A constant channel whose largest output is ~0 passes nothing on even when it is "positive".
    silent = (rate <= t.dead_rate) | (constant & (activity.max <= t.constant_std))
    dead = silent if can_fire else np.zeros_like(rate, dtype=bool)
    rare = (rate <= t.rare_rate) & ~dead if can_fire else np.zeros_like(dead)
    predicted = sorted(set(static.dead) | set(static.possibly_dead))
    return MeasuredLayer(activity, _idx(dead), _idx(rare), _idx(constant), predicted)


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


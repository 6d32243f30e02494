"""OPM (Wei et al., "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024): the
probability with which each modality's feature would be dropped.

``r_m = tanh(relu(s_m / s_other - 1))`` over the OGM-GE scores ``s_m``;
``q_m = q_base * (1 + lam * r_m)`` if ``r_m > 0`` else 0, clipped to [0, 1] (``q_base`` 0.5,
``lam`` 0.5); the batch-level execution probability (0.7) is reported as a parameter only. Reported
over all the data and as the mean of the per-batch values, as for OGM-GE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from avdiag.measure.contribution import unimodal
from avdiag.measure.contribution.ogm import BatchScores, as_batch_scores, batch_mean, dataset_scores, score_ratio
from avdiag.models.parts import AVParts
from avdiag.results import json_safe

OPM_Q_BASE = 0.5
OPM_LAMBDA = 0.5
OPM_EXECUTE_PROBABILITY = 0.7


def opm_drop_probabilities(s_audio: float, s_visual: float, q_base: float = OPM_Q_BASE,
                           lam: float = OPM_LAMBDA) -> dict[str, dict[str, float]]:
    """``{"ratio": {m: r_m}, "drop_probability": {m: q_m}}`` with r_m = tanh(relu(s_m / s_other - 1)),
    q_m = clip(q_base * (1 + lam * r_m), 0, 1) if r_m > 0 else 0."""
    scores = {"audio": s_audio, "visual": s_visual}
    ratio, drop = {}, {}
    for m, other in (("audio", "visual"), ("visual", "audio")):
        rel = score_ratio(scores[m], scores[other]) - 1.0
        r = math.tanh(max(rel, 0.0)) if not math.isnan(rel) else math.nan
        ratio[m] = r
        drop[m] = min(max(q_base * (1.0 + lam * r), 0.0), 1.0) if r > 0 else (math.nan if math.isnan(r) else 0.0)
    return {"ratio": ratio, "drop_probability": drop}


@dataclass(frozen=True)
class OPMResult:
    """OPM's drop probabilities at the dataset level and per batch, derived from the per-batch scores."""

    q_base: float
    lam: float
    execute_probability: float  # the chance OPM acts on a batch at all; a parameter, not measured
    batch_scores: BatchScores

    def _dataset(self) -> dict[str, dict[str, float]]:
        s = dataset_scores(self.batch_scores)
        return opm_drop_probabilities(s["audio"], s["visual"], self.q_base, self.lam)

    @property
    def ratio(self) -> dict[str, float]:
        return self._dataset()["ratio"]

    @property
    def drop_probability(self) -> dict[str, float]:
        return self._dataset()["drop_probability"]

    @property
    def batch_mean_drop_probability(self) -> dict[str, float]:
        return batch_mean([opm_drop_probabilities(a, v, self.q_base, self.lam)["drop_probability"]
                           for a, v, *_ in self.batch_scores])

    def to_dict(self) -> dict:
        return json_safe({
            "q_base": self.q_base, "lambda": self.lam, "execute_probability": self.execute_probability,
            "ratio": self.ratio, "drop_probability": self.drop_probability,
            "batch_mean_drop_probability": self.batch_mean_drop_probability, "batch_scores": self.batch_scores})

    @classmethod
    def from_dict(cls, d: dict) -> "OPMResult":
        return cls(float(d["q_base"]), float(d["lambda"]), float(d["execute_probability"]),
                   as_batch_scores(d["batch_scores"]))

    @classmethod
    def combine(cls, results: Sequence["OPMResult"]) -> "OPMResult":
        """Merge the results of disjoint shards (their batches together)."""
        if not results:
            raise ValueError("nothing to combine")
        settings = {(r.q_base, r.lam, r.execute_probability) for r in results}
        if len(settings) > 1:
            raise ValueError("cannot combine OPM results of different parameters")
        first = results[0]
        return cls(first.q_base, first.lam, first.execute_probability,
                   as_batch_scores([row for r in results for row in r.batch_scores]))


def measure(parts: AVParts, batches: Iterable[dict], device: torch.device | str = "cpu", *,
            q_base: float = OPM_Q_BASE, lam: float = OPM_LAMBDA,
            execute_probability: float = OPM_EXECUTE_PROBABILITY, tf32: bool = False) -> OPMResult:
    """OPM's drop probabilities over ``batches`` (eval mode, no gradients)."""
    scores = unimodal.measure(parts, batches, device, tf32=tf32).batch_scores
    return OPMResult(q_base, lam, execute_probability, as_batch_scores(scores))

"""OGM-GE (Peng, Wei et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022): the gradient-modulation coefficients a model's predictions would get.

Scores ``s_m = sum_i softmax(out_m)_i[y_i]`` over the uni-modal logits; ``rho_v = s_v / s_a``,
``rho_a = 1 / rho_v``; with ``alpha`` (0.8 by default): if ``rho_v > 1``:
``k_v = 1 - tanh(alpha * rho_v)``, ``k_a = 1``, else ``k_a = 1 - tanh(alpha * rho_a)``, ``k_v = 1``
(tanh of rho, not of rho - 1, as the authors' code does). The authors compute this per training
mini-batch; both levels are reported: the scores summed over all the data with the rho and
coefficients they give, and the mean over batches of the per-batch coefficients (what training on
these batches would apply on average). Measured in eval mode, not in training mode as during
OGM-GE training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from avdiag.measure.contribution import unimodal
from avdiag.measure.contribution.passes import MODALITIES
from avdiag.measure.contribution.table import float_column
from avdiag.models.parts import AVParts
from avdiag.results import json_safe

OGM_ALPHA = 0.8
BatchScores = tuple[tuple[float, float, float, float], ...]  # per batch: s_audio, s_visual, size, first index


def score_ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def ogm_coefficients(s_audio: float, s_visual: float, alpha: float = OGM_ALPHA) -> dict[str, dict[str, float]]:
    """OGM-GE from the scores: ``{"rho": {...}, "coefficients": {...}}``.

    rho_v = s_v / s_a, rho_a = 1 / rho_v; if rho_v > 1: k_v = 1 - tanh(alpha * rho_v), k_a = 1;
    else k_a = 1 - tanh(alpha * rho_a), k_v = 1.
    """
    rho_v = score_ratio(s_visual, s_audio)
    rho_a = math.inf if rho_v == 0 else 1.0 / rho_v  # 1 / inf = 0; NaN stays NaN
    if rho_v > 1:
        k_a, k_v = 1.0, 1.0 - math.tanh(alpha * rho_v)
    else:
        k_a, k_v = 1.0 - math.tanh(alpha * rho_a), 1.0
    return {"rho": {"audio": rho_a, "visual": rho_v}, "coefficients": {"audio": k_a, "visual": k_v}}


def as_batch_scores(rows) -> BatchScores:
    """``(n_batches, 4)`` rows (an array or JSON lists; null reads back as NaN) as a tuple of tuples,
    in the order of the batches' first dataset index (so that merged shards list them as one run)."""
    rows = [tuple(float(x) for x in float_column(list(r))) for r in rows]
    return tuple(sorted(rows, key=lambda r: r[3]))


def dataset_scores(batch_scores: BatchScores) -> dict[str, float]:
    """``s_m`` over all the data: the per-batch sums added, correctly rounded (order-independent)."""
    return {m: math.fsum(row[i] for row in batch_scores) for i, m in enumerate(MODALITIES)}


def batch_mean(per_batch: list[dict[str, float]]) -> dict[str, float]:
    """Per modality, the mean over batches (NaN without batches). The batches are in the order of
    their first dataset index (:func:`as_batch_scores`), so merged shards give the same mean."""
    return {m: float(np.mean([d[m] for d in per_batch])) if per_batch else math.nan for m in MODALITIES}


@dataclass(frozen=True)
class OGMResult:
    """OGM-GE at the dataset level and per batch, derived from the per-batch scores."""

    alpha: float
    batch_scores: BatchScores

    @property
    def n_batches(self) -> int:
        return len(self.batch_scores)

    @property
    def scores(self) -> dict[str, float]:
        return dataset_scores(self.batch_scores)

    def _dataset(self) -> dict[str, dict[str, float]]:
        s = self.scores
        return ogm_coefficients(s["audio"], s["visual"], self.alpha)

    @property
    def rho(self) -> dict[str, float]:
        return self._dataset()["rho"]

    @property
    def coefficients(self) -> dict[str, float]:
        return self._dataset()["coefficients"]

    @property
    def batch_mean_coefficients(self) -> dict[str, float]:
        return batch_mean([ogm_coefficients(a, v, self.alpha)["coefficients"] for a, v, *_ in self.batch_scores])

    @property
    def dominant(self) -> str | None:
        """The modality OGM-GE would slow down (its coefficient below 1), None when balanced."""
        below = [m for m in MODALITIES if self.coefficients[m] < 1.0]
        return below[0] if below else None

    def to_dict(self) -> dict:
        return json_safe({
            "alpha": self.alpha, "scores": self.scores, "rho": self.rho, "coefficients": self.coefficients,
            "batch_mean_coefficients": self.batch_mean_coefficients, "dominant": self.dominant,
            "n_batches": self.n_batches,
            "level": "scores, rho and coefficients over the whole data; batch_mean_coefficients: "
                     "mean of the per-batch coefficients (the authors' per-batch rule)",
            "batch_scores": self.batch_scores})

    @classmethod
    def from_dict(cls, d: dict) -> "OGMResult":
        return cls(float(d["alpha"]), as_batch_scores(d["batch_scores"]))

    @classmethod
    def combine(cls, results: Sequence["OGMResult"]) -> "OGMResult":
        """Merge the results of disjoint shards (their batches together)."""
        if not results:
            raise ValueError("nothing to combine")
        if len({r.alpha for r in results}) > 1:
            raise ValueError("cannot combine OGM-GE results of different alpha")
        return cls(results[0].alpha, as_batch_scores([row for r in results for row in r.batch_scores]))


def measure(parts: AVParts, batches: Iterable[dict], device: torch.device | str = "cpu", *,
            alpha: float = OGM_ALPHA, tf32: bool = False) -> OGMResult:
    """OGM-GE's scores and coefficients over ``batches`` (eval mode, no gradients)."""
    return OGMResult(alpha, as_batch_scores(unimodal.measure(parts, batches, device, tf32=tf32).batch_scores))

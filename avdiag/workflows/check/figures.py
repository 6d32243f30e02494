"""The figures the data rules read for one checkpoint, from the measures of `avdiag conflict`
(per-batch gradients only, no per-sample pass, no held-out learning state)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from avdiag.results import finite

SHARE_DEFINITION = "Shapley value in the gain game 1[correct_S] - 1[correct_empty], over the sum of both"


@dataclass
class DataFigures:
    """What the data rules read for one checkpoint (the ``data`` entry of a file in the JSON).

    ``modalities[m]``: ``share_accuracy`` / ``share_probability`` (the contribution share, below),
    ``shapley_accuracy`` / ``shapley_probability`` (the paper's dataset means, as `avdiag conflict`
    reports them), ``unimodal_accuracy``, ``ogm_score``, ``rho`` (OGM-GE: this modality's score over
    the other's), ``cos_mean`` and ``conflict_rate`` (MMPareto cosine of encoder m over the batches).

    The contribution share is the modality's exact two-player Shapley value in the GAIN game
    ``g(S) = 1[correct_S] - 1[correct_empty]`` (probability-valued: ``p_S[y] - p_empty[y]``), over
    the sum of both, ``acc_fused - acc_empty``: a modality the fused head ignores gets 0, two that
    contribute alike 0.5 each. (In the paper's game ``v(S) = |S| * 1[correct_S]`` an ignored
    modality still gets about a quarter of the value, which makes a poor threshold.) It follows
    exactly from the paper's values: ``phi'_a = ((phi_a - phi_v) + acc_fused - acc_empty) / 2``.
    None when ``acc_fused <= acc_empty`` (the model does no better than its head's biases)."""

    data: str
    model: str
    n_samples: int
    n_batches: int
    fused_accuracy: float
    empty_accuracy: float
    unimodal_source: str
    head_cos_mean: float | None
    modalities: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @classmethod
    def from_conflict(cls, result: Any) -> "DataFigures":
        """From a conflict result (``.conflict``: gradient conflict, ``.contribution``: contribution)."""
        contribution, conflict = result.contribution, result.conflict
        phi = {kind: {m: getattr(c, f"shapley_mean_{kind}") for m, c in contribution.modalities.items()}
               for kind in ("accuracy", "probability")}
        fused_probability = float(contribution.samples["fused_probability"].mean())
        gain = {"accuracy": contribution.fused_accuracy - contribution.empty_accuracy,
                "probability": fused_probability - contribution.empty_probability}
        modalities = {}
        for m, c in contribution.modalities.items():
            s = conflict.summaries.get(m)
            modalities[m] = {
                "share_accuracy": _share(phi["accuracy"], gain["accuracy"], m),
                "share_probability": _share(phi["probability"], gain["probability"], m),
                "shapley_accuracy": c.shapley_mean_accuracy, "shapley_probability": c.shapley_mean_probability,
                "unimodal_accuracy": c.unimodal_accuracy, "ogm_score": c.ogm_score,
                "rho": contribution.ogm.rho.get(m),
                "cos_mean": s.cos_mean if s else None, "conflict_rate": s.conflict_rate if s else None}
        return cls(result.data, result.model, contribution.n_samples, contribution.n_batches,
                   contribution.fused_accuracy, contribution.empty_accuracy, contribution.unimodal_source,
                   conflict.head_cos_mean, modalities)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "model": self.model, "n_samples": self.n_samples, "n_batches": self.n_batches,
                "fused_accuracy": finite(self.fused_accuracy), "empty_accuracy": finite(self.empty_accuracy),
                "unimodal_source": self.unimodal_source, "head_cos_mean": finite(self.head_cos_mean),
                "share": SHARE_DEFINITION,
                "modalities": {m: {k: finite(v) for k, v in d.items()} for m, d in self.modalities.items()}}


def _share(phi: dict[str, float], gain: float, m: str) -> float | None:
    """The gain-game share of ``m`` from the paper's Shapley means (two modalities)."""
    if len(phi) != 2 or not gain > 0 or not math.isfinite(gain):
        return None
    other = next(o for o in phi if o != m)
    return ((phi[m] - phi[other]) + gain) / 2 / gain


def measure_on_data(subject: Any, data: Any, ogm_alpha: float) -> DataFigures:
    """The figures of ``subject`` (an open Subject, its model resolved once) on ``data`` (a DataSource)."""
    from avdiag.workflows.conflict import conflict

    return DataFigures.from_conflict(conflict(subject, data, per_sample=False, heldout_split=None,
                                              ogm_alpha=ogm_alpha))

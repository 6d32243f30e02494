"""The contribution of each modality, all measures together: :class:`Contribution` (built by
:meth:`ContributionPartial.result <avdiag.measure.contribution.partial.ContributionPartial.result>`)
and its per-modality view :class:`ModalityContribution`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from avdiag.measure.contribution.learning_state import LearningStateResult
from avdiag.measure.contribution.modality_gap import ModalityGap
from avdiag.measure.contribution.ogm import OGMResult
from avdiag.measure.contribution.opm import OPMResult
from avdiag.measure.contribution.passes import MODALITIES
from avdiag.measure.contribution.shapley import KINDS, V_EMPTY, ShapleyValues
from avdiag.measure.contribution.table import json_column
from avdiag.measure.contribution.unimodal import UnimodalPredictions
from avdiag.results import finite


@dataclass(frozen=True)
class ModalityContribution:
    """One modality's figures: mean Shapley values, uni-modal accuracy, OGM-GE score."""

    modality: str
    shapley_mean_accuracy: float
    shapley_mean_probability: float
    shapley_input_mean_accuracy: float | None  # None when the input ablation was not run
    shapley_input_mean_probability: float | None
    unimodal_accuracy: float
    ogm_score: float  # dataset-level OGM-GE score: sum over samples of softmax(out_m)[y]

    def to_dict(self) -> dict:
        input_mean = None
        if self.shapley_input_mean_accuracy is not None:
            input_mean = {"accuracy": finite(self.shapley_input_mean_accuracy),
                          "probability": finite(self.shapley_input_mean_probability)}
        return {"shapley_mean": {"accuracy": finite(self.shapley_mean_accuracy),
                                 "probability": finite(self.shapley_mean_probability)},
                "shapley_input_ablation_mean": input_mean,
                "unimodal_accuracy": finite(self.unimodal_accuracy),
                "ogm": {"score": finite(self.ogm_score)}}

    @classmethod
    def from_dict(cls, modality: str, d: dict) -> "ModalityContribution":
        """Null reads back as NaN, except the input-ablation means when that ablation was not run."""
        num = lambda v: float("nan") if v is None else float(v)  # noqa: E731
        inp = d.get("shapley_input_ablation_mean")
        return cls(modality, num(d["shapley_mean"]["accuracy"]), num(d["shapley_mean"]["probability"]),
                   None if inp is None else num(inp["accuracy"]), None if inp is None else num(inp["probability"]),
                   num(d["unimodal_accuracy"]), num(d["ogm"]["score"]))


@dataclass(eq=False)
class Contribution:
    """Every contribution measure over the same samples; the figures derive from the measures' records.

    ``to_dict(samples=False)`` is the report; ``to_dict(records=True)`` adds every measure's records,
    which is what ``from_dict`` reads back and what ``combine`` (shards together) works on.
    """

    shapley: ShapleyValues  # pooled feature zeroed
    shapley_input: ShapleyValues | None  # raw input zeroed; None when not run
    unimodal: UnimodalPredictions
    ogm: OGMResult
    opm: OPMResult
    learning_state: LearningStateResult | None  # None when the pooled features were not kept
    modality_gap: ModalityGap

    @property
    def n_samples(self) -> int:
        return self.unimodal.n

    @property
    def n_batches(self) -> int:
        return self.ogm.n_batches

    @property
    def n_classes(self) -> int:
        return self.unimodal.n_classes

    @property
    def unimodal_source(self) -> str:
        return self.unimodal.unimodal_source

    @property
    def fused_accuracy(self) -> float:
        return self.shapley.coalition_accuracy("audio+visual")

    @property
    def empty_accuracy(self) -> float:
        """Accuracy of the all-zero coalition (the head's biases alone); not counted by v(empty) = 0."""
        return self.shapley.coalition_accuracy("empty")

    @property
    def empty_probability(self) -> float:
        return self.shapley.coalition_probability("empty")

    @cached_property
    def modalities(self) -> dict[str, ModalityContribution]:
        scores = self.ogm.scores
        inp = self.shapley_input
        return {m: ModalityContribution(
            m, self.shapley.mean(m, "accuracy"), self.shapley.mean(m, "probability"),
            inp.mean(m, "accuracy") if inp else None, inp.mean(m, "probability") if inp else None,
            self.unimodal.accuracy(m), scores[m]) for m in MODALITIES}

    @cached_property
    def samples(self) -> dict[str, np.ndarray]:
        """Per-sample columns in dataset-index order: index, label, ``phi_<modality>_<kind>`` (and
        the ``_input`` columns of the input ablation), correctness and true-class probability of the
        fused, empty-coalition and uni-modal predictions."""
        shapley, uni = self.shapley.sorted(), self.unimodal.sorted()
        games = [("", shapley)] + ([("_input", self.shapley_input.sorted())] if self.shapley_input else [])
        if any(not np.array_equal(g.index, uni.index) for _, g in games):
            raise ValueError("the Shapley values and the uni-modal predictions cover different samples")
        cols: dict[str, np.ndarray] = {"index": uni.index, "label": uni.label}
        for suffix, game in games:
            for kind in KINDS:
                for m in MODALITIES:
                    cols[f"phi_{m}_{kind}{suffix}"] = game.phi(kind)[m]
        for name, coalition in (("fused", "audio+visual"), ("empty", "empty")):
            cols[f"{name}_correct"] = shapley.correct[coalition].astype(bool)
            cols[f"{name}_probability"] = shapley.probability[coalition].astype(np.float64)
        for m in MODALITIES:
            cols[f"uni_{m}_correct"] = uni.correct[m].astype(bool)
            cols[f"uni_{m}_probability"] = uni.probability[m].astype(np.float64)
        return cols

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: the columns of :attr:`samples`."""
        return pd.DataFrame({k: v.copy() for k, v in self.samples.items()})

    def to_dict(self, samples: bool = False, records: bool = False) -> dict:
        out = {"n_samples": self.n_samples, "n_batches": self.n_batches, "n_classes": self.n_classes,
               "unimodal_source": self.unimodal_source, "fused_accuracy": finite(self.fused_accuracy),
               "empty_coalition": {"accuracy": finite(self.empty_accuracy),
                                   "probability": finite(self.empty_probability)},
               "shapley": {"removal": "pooled feature zeroed before the fused head",
                           "value": "v(S) = |S| * 1[correct] (accuracy) or |S| * softmax[y] (probability)",
                           "v_empty": V_EMPTY},
               "modalities": {m: c.to_dict() for m, c in self.modalities.items()},
               "ogm": self.ogm.to_dict(), "opm": self.opm.to_dict(),
               "learning_state": self.learning_state.to_dict(records=False) if self.learning_state else None,
               "modality_gap": self.modality_gap.to_dict(records=False)}
        if samples:
            out["samples"] = {k: json_column(v) for k, v in self.samples.items()}
        if records:
            out["records"] = {
                "shapley": self.shapley.to_dict(),
                "shapley_input": self.shapley_input.to_dict() if self.shapley_input else None,
                "unimodal": self.unimodal.to_dict(), "ogm": self.ogm.to_dict(), "opm": self.opm.to_dict(),
                "learning_state": self.learning_state.to_dict() if self.learning_state else None,
                "modality_gap": self.modality_gap.to_dict()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Contribution":
        """From ``to_dict(records=True)``; every figure is derived again from the records."""
        r = d.get("records")
        if r is None:
            raise ValueError("this contribution document has no records: write it with to_dict(records=True)")
        return cls(ShapleyValues.from_dict(r["shapley"]),
                   ShapleyValues.from_dict(r["shapley_input"]) if r["shapley_input"] is not None else None,
                   UnimodalPredictions.from_dict(r["unimodal"]), OGMResult.from_dict(r["ogm"]),
                   OPMResult.from_dict(r["opm"]),
                   LearningStateResult.from_dict(r["learning_state"]) if r["learning_state"] is not None else None,
                   ModalityGap.from_dict(r["modality_gap"]))

    @classmethod
    def combine(cls, results: Sequence["Contribution"]) -> "Contribution":
        """Merge the results of disjoint shards, measure by measure."""
        if not results:
            raise ValueError("nothing to combine")
        for name in ("shapley_input", "learning_state"):
            if len({getattr(r, name) is None for r in results}) > 1:
                raise ValueError(f"shards disagree on whether {name.replace('_', ' ')} was measured")
        first = results[0]

        def merged(name: str, kind):
            return None if getattr(first, name) is None else kind.combine([getattr(r, name) for r in results])

        return cls(ShapleyValues.combine([r.shapley for r in results]), merged("shapley_input", ShapleyValues),
                   UnimodalPredictions.combine([r.unimodal for r in results]),
                   OGMResult.combine([r.ogm for r in results]), OPMResult.combine([r.opm for r in results]),
                   merged("learning_state", LearningStateResult),
                   ModalityGap.combine([r.modality_gap for r in results]))

"""Sample-level modality valuation (Wei et al., "Enhancing multimodal cooperation via sample-level
modality valuation", CVPR 2024): an exact two-player Shapley value per sample.

A modality is removed by zeroing its POOLED FEATURE before the fused classifier (``ablation=
"feature"``): the encoders run once per batch and the fused head once on the four coalitions
{a, v}, {a, 0}, {0, v}, {0, 0} stacked into one call, so it costs about one plain forward. Value of
a coalition S:

- accuracy-valued (the paper's): ``v(S) = |S| * 1[argmax f(S) == y]``;
- probability-valued (a smoother variant): ``v(S) = |S| * softmax(f(S))[y]``.

In both ``v(empty) = 0`` (the factor ``|S|`` is 0). Then
``phi_a = ((v_a - v_empty) + (v_av - v_v)) / 2`` and ``phi_v = ((v_v - v_empty) + (v_av - v_a)) / 2``,
so ``phi_a + phi_v = v_av`` (efficiency). The all-zero coalition is still run, and its accuracy and
true-class probability reported: they show what the head predicts from its biases alone.

``ablation="input"`` is a different ablation, named apart: the RAW INPUT of the modality is zeroed
and its encoder re-run (as another toolkit does); the zero input's feature is the encoder's output on
one all-zero sample of the batch's shape, broadcast (in eval mode every sample is processed
independently, so this equals running the zeroed batch, up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from avdiag.measure.contribution.passes import MODALITIES, device_of, run
from avdiag.measure.contribution.table import (
    bool_column, concat, disjoint_index, float_column, index_order, int_column, json_column, reorder,
)
from avdiag.measure.precision import f32
from avdiag.models.parts import AVParts

COALITIONS = ("audio+visual", "audio", "visual", "empty")
SIZES = {"audio+visual": 2, "audio": 1, "visual": 1, "empty": 0}
V_EMPTY = 0.0  # v(empty) in both the accuracy- and the probability-valued game (|S| = 0)
ABLATIONS = ("feature", "input")
KINDS = ("accuracy", "probability")


def coalition_values(kind: str, correct: dict[str, np.ndarray], probability: dict[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
    """v(S) per sample for each coalition: |S| * 1[correct] or |S| * p_S(y); v(empty) = 0."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'accuracy' or 'probability', got {kind!r}")
    quality = correct if kind == "accuracy" else probability
    out = {c: SIZES[c] * quality[c].astype(np.float64) for c in COALITIONS if c != "empty"}
    out["empty"] = np.full(len(quality["audio+visual"]), V_EMPTY)
    return out


def shapley_values(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact two-player Shapley values from the coalition values ``v`` (keys as COALITIONS)."""
    return {"audio": ((v["audio"] - v["empty"]) + (v["audio+visual"] - v["visual"])) / 2.0,
            "visual": ((v["visual"] - v["empty"]) + (v["audio+visual"] - v["audio"])) / 2.0}


@dataclass(eq=False)
class ShapleyValues:
    """Per-sample two-player Shapley values of one ablation, for one batch or many.

    ``correct`` / ``probability``: per coalition (COALITIONS), whether the fused head's argmax is
    the label and its softmax at the label; ``phi_accuracy`` / ``phi_probability``: per modality,
    derived from them. Means run over the samples in dataset-index order.
    """

    ablation: str  # "feature" (pooled feature zeroed) or "input" (raw input zeroed, encoder re-run)
    index: np.ndarray
    label: np.ndarray
    correct: dict[str, np.ndarray]
    probability: dict[str, np.ndarray]
    phi_accuracy: dict[str, np.ndarray] = field(init=False)
    phi_probability: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.phi_accuracy = shapley_values(self.values("accuracy"))
        self.phi_probability = shapley_values(self.values("probability"))

    @property
    def n(self) -> int:
        return int(len(self.index))

    def values(self, kind: str) -> dict[str, np.ndarray]:
        """v(S) per coalition, ``kind`` "accuracy" or "probability"."""
        return coalition_values(kind, self.correct, self.probability)

    def phi(self, kind: str) -> dict[str, np.ndarray]:
        return self.phi_accuracy if kind == "accuracy" else self.phi_probability

    def _mean(self, x: np.ndarray) -> float:
        return float(np.sum(x[index_order(self.index)], dtype=np.float64) / self.n) if self.n else float("nan")

    def mean(self, modality: str, kind: str) -> float:
        """The dataset mean of ``phi_<modality>`` in the ``kind``-valued game."""
        return self._mean(self.phi(kind)[modality])

    def coalition_accuracy(self, coalition: str) -> float:
        return self._mean(self.correct[coalition])

    def coalition_probability(self, coalition: str) -> float:
        return self._mean(self.probability[coalition])

    def sorted(self) -> "ShapleyValues":
        """The same values in dataset-index order."""
        cols = reorder(self._columns(), index_order(self.index))
        return ShapleyValues(self.ablation, **cols)

    def _columns(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "correct": self.correct, "probability": self.probability}

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: index, label, ``phi_<modality>_<kind>``."""
        cols = {"index": self.index, "label": self.label}
        cols.update({f"phi_{m}_{kind}": self.phi(kind)[m] for kind in KINDS for m in MODALITIES})
        return pd.DataFrame(cols)

    def to_dict(self) -> dict:
        return {"ablation": self.ablation, "index": json_column(self.index), "label": json_column(self.label),
                "correct": {c: json_column(x) for c, x in self.correct.items()},
                "probability": {c: json_column(x) for c, x in self.probability.items()},
                "phi_accuracy": {m: json_column(x) for m, x in self.phi_accuracy.items()},
                "phi_probability": {m: json_column(x) for m, x in self.phi_probability.items()},
                "v_empty": V_EMPTY}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapleyValues":
        """Rebuild from ``to_dict()``; the Shapley values are derived again from the coalitions."""
        return cls(d["ablation"], int_column(d["index"]), int_column(d["label"]),
                   {c: bool_column(x) for c, x in d["correct"].items()},
                   {c: float_column(x) for c, x in d["probability"].items()})

    @classmethod
    def combine(cls, results: Sequence["ShapleyValues"]) -> "ShapleyValues":
        """Merge the values of disjoint shards, in dataset-index order."""
        if not results:
            raise ValueError("nothing to combine")
        if len({r.ablation for r in results}) > 1:
            raise ValueError("cannot combine Shapley values of different ablations")
        disjoint_index([r.index for r in results])
        return ShapleyValues(results[0].ablation, **concat([r._columns() for r in results])).sorted()


def play(parts: AVParts, a: torch.Tensor, v: torch.Tensor, za: torch.Tensor, zv: torch.Tensor,
         label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused-head call on the stacked coalitions {a,v}, {a,zv}, {za,v}, {za,zv}: (4, B) correct, prob."""
    n = label.shape[0]
    logits = f32(parts.fuse(torch.cat((a, a, za, za)), torch.cat((v, zv, v, zv))))
    logits = logits.reshape(4, n, logits.shape[-1])
    target = label.long().expand(4, n)
    correct = logits.argmax(dim=-1) == target
    prob = F.softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return correct, prob


def zero_input_features(parts: AVParts, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each encoder's pooled output on one all-zero input of the batch's shape, broadcast to (B, d)."""
    n = batch["label"].shape[0]
    zeros = {m: torch.zeros_like(batch[m][:1]) for m in MODALITIES}
    feats = parts.features(zeros)
    return {m: f.expand(n, f.shape[1]) for m, f in feats.items()}


class ShapleyCollector:
    """The coalition outcomes of every batch of a pass, for one ablation."""

    def __init__(self, ablation: str = "feature"):
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        self.ablation = ablation
        self.parts: dict[str, list[torch.Tensor]] = {"index": [], "label": [], "correct": [], "probability": []}

    def add(self, parts: AVParts, batch: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
            index: torch.Tensor) -> None:
        a, v = feats["audio"], feats["visual"]
        if self.ablation == "feature":
            za, zv = torch.zeros_like(a), torch.zeros_like(v)
        else:
            zero = zero_input_features(parts, batch)
            za, zv = zero["audio"], zero["visual"]
        correct, prob = play(parts, a, v, za, zv, batch["label"])
        for key, x in (("index", index), ("label", batch["label"].long()), ("correct", correct),
                       ("probability", prob)):
            self.parts[key].append(x)

    def result(self) -> ShapleyValues:
        index, label = (torch.cat(self.parts[k]).cpu().numpy().astype(np.int64) for k in ("index", "label"))
        correct = torch.cat(self.parts["correct"], dim=1).cpu().numpy()
        prob = torch.cat(self.parts["probability"], dim=1).double().cpu().numpy()
        return ShapleyValues(self.ablation, index, label, {c: correct[i] for i, c in enumerate(COALITIONS)},
                             {c: prob[i] for i, c in enumerate(COALITIONS)})


def measure(parts: AVParts, batches: Iterable[dict], device: torch.device | str = "cpu", *,
            ablation: str = "feature", tf32: bool = False) -> ShapleyValues:
    """Per-sample Shapley values of every sample of ``batches`` (eval mode, no gradients)."""
    collector = ShapleyCollector(ablation)
    run(parts, batches, device, [collector], tf32=tf32)
    return collector.result()


def shapley_batch(parts: AVParts, batch: dict[str, Any]) -> ShapleyValues:
    """Per-sample Shapley values of one batch, the POOLED FEATURE of a modality zeroed before the
    fused head. Encoders run once; the head once on the four stacked coalitions. Eval mode, no
    gradients, on the model's device."""
    return measure(parts, [batch], device_of(parts), ablation="feature")


def shapley_input_ablation(parts: AVParts, batch: dict[str, Any]) -> ShapleyValues:
    """Per-sample Shapley values of one batch with the RAW INPUT of a modality zeroed and its encoder
    re-run (the zero input's feature is computed once per batch and broadcast)."""
    return measure(parts, [batch], device_of(parts), ablation="input")

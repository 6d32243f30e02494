"""What each modality predicts on its own: the argmax and the true-class probability of the
uni-modal logits of :class:`~avdiag.models.parts.AVParts` (trained uni-modal heads, a slice of the
fused linear classifier, or feature ablation: ``unimodal_source`` says which), per sample, and the
per-batch sums of the true-class probabilities that OGM-GE and OPM take as their scores."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avdiag.measure.contribution.passes import MODALITIES, run
from avdiag.measure.contribution.table import (
    bool_column, concat, disjoint_index, float_column, index_order, int_column, json_column, reorder,
)
from avdiag.measure.precision import f32
from avdiag.models.parts import AVParts
from avdiag.results import finite


def true_class(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: whether the argmax is the label, and the softmax at the label."""
    logits = f32(logits)
    prob = F.softmax(logits, dim=-1).gather(-1, label.long().unsqueeze(-1)).squeeze(-1)
    return logits.argmax(dim=-1) == label, prob


@dataclass(eq=False)
class UnimodalPredictions:
    """Per sample and modality: ``correct`` (argmax == label) and ``probability`` (softmax at the
    label); per batch, ``batch_scores`` rows ``(s_audio, s_visual, batch size, first dataset index)`` with
    ``s_m = sum over the batch of probability[m]``."""

    n_classes: int
    unimodal_source: str
    index: np.ndarray
    label: np.ndarray
    correct: dict[str, np.ndarray]
    probability: dict[str, np.ndarray]
    batch_scores: np.ndarray  # (n_batches, 4)

    @property
    def n(self) -> int:
        return int(len(self.index))

    def accuracy(self, modality: str) -> float:
        """Share of the samples the modality's uni-modal logits classify right."""
        x = self.correct[modality][index_order(self.index)]
        return float(np.sum(x, dtype=np.float64) / self.n) if self.n else float("nan")

    def sorted(self) -> "UnimodalPredictions":
        """The same predictions, samples in dataset-index order."""
        cols = reorder(self._columns(), index_order(self.index))
        return UnimodalPredictions(self.n_classes, self.unimodal_source, batch_scores=self.batch_scores, **cols)

    def _columns(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "correct": self.correct, "probability": self.probability}

    def to_dict(self) -> dict:
        return {"n_classes": self.n_classes, "unimodal_source": self.unimodal_source,
                "accuracy": {m: finite(self.accuracy(m)) for m in MODALITIES},
                "index": json_column(self.index), "label": json_column(self.label),
                "correct": {m: json_column(x) for m, x in self.correct.items()},
                "probability": {m: json_column(x) for m, x in self.probability.items()},
                "batch_scores": json_column(self.batch_scores)}

    @classmethod
    def from_dict(cls, d: dict) -> "UnimodalPredictions":
        return cls(int(d["n_classes"]), d["unimodal_source"], int_column(d["index"]), int_column(d["label"]),
                   {m: bool_column(x) for m, x in d["correct"].items()},
                   {m: float_column(x) for m, x in d["probability"].items()},
                   np.array(d["batch_scores"], dtype=np.float64).reshape(-1, 4))

    @classmethod
    def combine(cls, results: Sequence["UnimodalPredictions"]) -> "UnimodalPredictions":
        """Merge disjoint shards: samples in dataset-index order, batch rows concatenated."""
        if not results:
            raise ValueError("nothing to combine")
        first = results[0]
        for r in results[1:]:
            for name in ("n_classes", "unimodal_source"):
                if getattr(r, name) != getattr(first, name):
                    raise ValueError(f"shards disagree on {name}: {getattr(first, name)!r} vs {getattr(r, name)!r}")
        disjoint_index([r.index for r in results])
        scores = np.concatenate([r.batch_scores for r in results]).reshape(-1, 4)
        scores = scores[np.argsort(scores[:, 3], kind="stable")]  # batches in order of their first index
        merged = UnimodalPredictions(first.n_classes, first.unimodal_source, batch_scores=scores,
                                     **concat([r._columns() for r in results]))
        return merged.sorted()


class UnimodalCollector:
    """The uni-modal predictions of every batch of a pass."""

    def __init__(self) -> None:
        self.columns: dict[str, list[torch.Tensor]] = {}
        self.batch_scores: list[torch.Tensor] = []
        self.n_classes: int | None = None

    def _put(self, name: str, x: torch.Tensor) -> None:
        self.columns.setdefault(name, []).append(x)

    def add(self, parts: AVParts, batch: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
            index: torch.Tensor) -> None:
        label = batch["label"].long()
        uni = parts.unimodal(feats["audio"], feats["visual"])
        self._put("index", index)
        self._put("label", label)
        sums = []
        for m in MODALITIES:
            ok, p = true_class(uni[m], label)
            self._put(f"correct:{m}", ok)
            self._put(f"probability:{m}", p)
            sums.append(p.double().sum())
        # torch.full, not torch.tensor: a tensor built from a host value is a blocking copy (a sync).
        size = torch.full((), label.shape[0], dtype=torch.float64, device=label.device)
        self.batch_scores.append(torch.stack((*sums, size, index.min().double())))
        self.n_classes = int(uni["audio"].shape[-1])

    def result(self, unimodal_source: str) -> UnimodalPredictions:
        host = {k: torch.cat(v).cpu().numpy() for k, v in self.columns.items()}
        return UnimodalPredictions(
            self.n_classes, unimodal_source, host["index"].astype(np.int64), host["label"].astype(np.int64),
            {m: host[f"correct:{m}"].astype(bool) for m in MODALITIES},
            {m: host[f"probability:{m}"].astype(np.float64) for m in MODALITIES},
            torch.stack(self.batch_scores).cpu().numpy().reshape(-1, 4))


def measure(parts: AVParts, batches: Iterable[dict], device: torch.device | str = "cpu", *,
            tf32: bool = False) -> UnimodalPredictions:
    """The uni-modal predictions on every sample of ``batches`` (eval mode, no gradients)."""
    collector = UnimodalCollector()
    run(parts, batches, device, [collector], tf32=tf32)
    return collector.result(parts.unimodal_source)

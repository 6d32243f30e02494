"""How much each modality contributes to an audio-visual classifier, and how imbalanced it is.

Everything here runs the model in eval mode under ``torch.inference_mode`` (no gradients, no
augmentation, BatchNorm on its running statistics) and restores every module's train/eval flag
afterwards. The model is reached through :class:`~avdiag.models.parts.AVParts`: pooled features
per modality, the fused head, and uni-modal logits (trained heads, a slice of the fused linear
classifier, or feature ablation: ``unimodal_source`` says which).

Measurements
------------

* **Sample-level modality valuation** (Wei et al., "Enhancing multimodal cooperation via
  sample-level modality valuation", CVPR 2024): an exact two-player Shapley value per sample.
  A modality is removed by zeroing its POOLED FEATURE before the fused classifier; the encoders
  run once per batch and the fused head once on the four coalitions {a, v}, {a, 0}, {0, v},
  {0, 0} stacked into one call, so it costs about one plain forward. Value of a coalition S:

  - accuracy-valued (the paper's): ``v(S) = |S| * 1[argmax f(S) == y]``;
  - probability-valued (a smoother variant): ``v(S) = |S| * softmax(f(S))[y]``.

  In both, ``v(empty) = 0``: the factor ``|S|`` is 0 for the empty coalition, so the convention
  is the paper's for both variants. Then ``phi_a = ((v_a - v_empty) + (v_av - v_v)) / 2`` and
  ``phi_v = ((v_v - v_empty) + (v_av - v_a)) / 2``, so ``phi_a + phi_v = v_av - v_empty = v_av``
  (efficiency). The all-zero coalition is still run and its accuracy and true-class probability
  are reported (``empty_accuracy``, ``empty_probability``): they show what the head predicts from
  its biases alone, which the Shapley values do not count.

  :func:`shapley_input_ablation` is a different ablation, named apart: the RAW INPUT of the
  modality is zeroed and its encoder re-run (as another toolkit does); the zero input's feature
  is the encoder's output on one all-zero sample of the batch's shape, broadcast (in eval mode
  every sample is processed independently, so this equals running the zeroed batch, up to float
  rounding).

* **OGM-GE** (Peng, Wei et al., "Balanced Multimodal Learning via On-the-fly Gradient
  Modulation", CVPR 2022): scores ``s_m = sum_i softmax(out_m)_i[y_i]`` over the uni-modal
  logits; ``rho_v = s_v / s_a``, ``rho_a = 1 / rho_v``; with ``alpha`` (0.8 by default): if
  ``rho_v > 1``: ``k_v = 1 - tanh(alpha * rho_v)``, ``k_a = 1``, else
  ``k_a = 1 - tanh(alpha * rho_a)``, ``k_v = 1`` (tanh of rho, not of rho - 1, as the authors'
  code does). The authors compute this per training mini-batch; both are reported: the
  dataset-level scores, rho and the coefficients they give (``scores``, ``rho``,
  ``coefficients``), and the mean over batches of the per-batch coefficients
  (``batch_mean_coefficients``, what training on these batches would apply on average). Measured
  in eval mode, not in training mode as during OGM-GE training.

* **OPM** (Wei et al., "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024): the
  drop probability of each modality's feature, ``r_m = tanh(relu(s_m / s_other - 1))``,
  ``q_m = q_base * (1 + lam * r_m)`` if ``r_m > 0`` else 0, clipped to [0, 1]
  (``q_base`` 0.5, ``lam`` 0.5); the batch-level execution probability (0.7) is reported as a
  parameter only. Dataset-level and per-batch mean, as for OGM-GE.

* **Uni-modal accuracies** (argmax of the uni-modal logits, with their source) and the fused
  accuracy (the {a, v} coalition).

* **Learning state** (Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced Multimodal
  Learning", ECCV 2024): k-means cluster purity of each modality's pooled features (k = the
  number of classes of the head, fixed seed) on the data given and on the held-out data when
  given; gap ``|P_train - P_heldout|`` and ``alpha = tanh(lam * gap)`` (lam 3), through
  :func:`avdiag.measure.learning_state.cluster_purity` and :class:`~avdiag.measure.learning_state.LearningState`.
  Rows are sorted by sample index before clustering, so the result does not depend on batch or
  shard order.

* **Modality gap** (as MMCSAL, cold-start multimodal active learning, defines it): the Euclidean
  distance between the centroids of the two modalities' L2-normalised pooled features (a zero
  feature stays zero). It needs equal feature sizes; otherwise it is None with the reason.

Combining shards (distributed runs)
-----------------------------------

:func:`contribution_partial` measures one shard and returns a :class:`ContributionPartial`:
per-sample rows (index, label, Shapley values, uni-modal and fused correctness and true-class
probability), per-batch sums and counts (``batch_scores``: ``s_audio, s_visual, batch size`` of
each batch), the sums of the L2-normalised features with their count, and the pooled features
with labels and indices (train and held-out) for the learning state.
:meth:`ContributionPartial.combine` concatenates rows, batch rows and features and adds the
feature sums; :meth:`ContributionPartial.result` turns any partial into the
:class:`ContributionResult`. Every dataset-level number is a function of those sums, counts and
rows (means are sums over rows divided by the row count, after sorting by index; per-batch means
run over the union of the shards' batches), so combining the shards of a partition of the data
gives the same result as one run over all of it, up to float summation order in the feature
centroids. Shards must be disjoint: ``combine`` refuses a sample index seen twice (a
``DistributedSampler`` without ``drop_last`` pads shards with repeated samples; drop the
repeats). A partial is picklable (``torch.distributed.all_gather_object``) and round-trips
through :meth:`ContributionPartial.to_dict` / :meth:`ContributionPartial.from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from avdiag.models.parts import AVParts
from avdiag.measure.learning_state import LearningState, cluster_purity

MODALITIES = ("audio", "visual")
COALITIONS = ("audio+visual", "audio", "visual", "empty")
SIZES = {"audio+visual": 2, "audio": 1, "visual": 1, "empty": 0}
V_EMPTY = 0.0  # v(empty) in both the accuracy- and the probability-valued game (|S| = 0)
ABLATIONS = ("feature", "input")

OGM_ALPHA = 0.8
OPM_Q_BASE = 0.5
OPM_LAMBDA = 0.5
OPM_EXECUTE_PROBABILITY = 0.7
RELEARN_LAMBDA = 3.0


def _jf(x: float | None) -> float | None:
    """A JSON-safe float: None for None, NaN and infinities."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _jlist(a: np.ndarray) -> list:
    if a.dtype.kind in "iub":
        return a.astype(np.int64).tolist() if a.dtype.kind != "b" else a.tolist()
    return [_jf(x) for x in a.astype(np.float64).ravel().tolist()]


def _jdict(d: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _jf(v) for k, v in d.items()}


# --- the two-player game -------------------------------------------------------------------------


def _values(kind: str, correct: dict[str, np.ndarray], probability: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """v(S) per sample for each coalition: |S| * 1[correct] or |S| * p_S(y); v(empty) = 0."""
    quality = correct if kind == "accuracy" else probability
    out = {c: SIZES[c] * quality[c].astype(np.float64) for c in COALITIONS if c != "empty"}
    out["empty"] = np.full(len(quality["audio+visual"]), V_EMPTY)
    return out


def shapley_values(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact two-player Shapley values from the coalition values ``v`` (keys as COALITIONS)."""
    return {"audio": ((v["audio"] - v["empty"]) + (v["audio+visual"] - v["visual"])) / 2.0,
            "visual": ((v["visual"] - v["empty"]) + (v["audio+visual"] - v["audio"])) / 2.0}


@dataclass
class ShapleyBatch:
    """Per-sample two-player Shapley values of one batch (see the module docstring).

    ``correct`` / ``probability``: per coalition (COALITIONS), whether the fused head's argmax is
    the label and its softmax at the label; ``phi_accuracy`` / ``phi_probability``: per modality.
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

    def values(self, kind: str) -> dict[str, np.ndarray]:
        """v(S) per coalition, ``kind`` "accuracy" or "probability"."""
        if kind not in ("accuracy", "probability"):
            raise ValueError(f"kind must be 'accuracy' or 'probability', got {kind!r}")
        return _values(kind, self.correct, self.probability)

    def to_dict(self) -> dict:
        return {"ablation": self.ablation, "index": _jlist(self.index), "label": _jlist(self.label),
                "correct": {c: _jlist(x) for c, x in self.correct.items()},
                "probability": {c: _jlist(x) for c, x in self.probability.items()},
                "phi_accuracy": {m: _jlist(x) for m, x in self.phi_accuracy.items()},
                "phi_probability": {m: _jlist(x) for m, x in self.phi_probability.items()},
                "v_empty": V_EMPTY}


# --- running the model ---------------------------------------------------------------------------


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode; every module's own train/eval flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _device_of(parts: AVParts) -> torch.device:
    p = next(parts.model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [k for k in (*MODALITIES, "label") if k not in batch]
    if missing:
        raise ValueError(f"contribution needs audio, visual and label in every batch; missing {missing}")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _index(batch: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    n = batch["label"].shape[0]
    if "index" in batch:
        return batch["index"].reshape(n).long()
    return torch.arange(start, start + n, device=batch["label"].device)


def _zero_input_features(parts: AVParts, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each encoder's pooled output on one all-zero input of the batch's shape, broadcast to (B, d)."""
    n = batch["label"].shape[0]
    zeros = {m: torch.zeros_like(batch[m][:1]) for m in MODALITIES}
    feats = parts.features(zeros)
    return {m: f.expand(n, f.shape[1]) for m, f in feats.items()}


def _coalitions(parts: AVParts, a: torch.Tensor, v: torch.Tensor, za: torch.Tensor, zv: torch.Tensor,
                label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused-head call on the stacked coalitions {a,v}, {a,zv}, {za,v}, {za,zv}: (4, B) correct, prob."""
    n = label.shape[0]
    logits = parts.fuse(torch.cat((a, a, za, za)), torch.cat((v, zv, v, zv))).float()
    logits = logits.reshape(4, n, logits.shape[-1])
    target = label.long().expand(4, n)
    correct = logits.argmax(dim=-1) == target
    prob = F.softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return correct, prob


def _true_class(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    prob = F.softmax(logits, dim=-1).gather(-1, label.long().unsqueeze(-1)).squeeze(-1)
    return logits.argmax(dim=-1) == label, prob


def _shapley_batch(parts: AVParts, batch: dict[str, Any], ablation: str) -> ShapleyBatch:
    with _evaluating(parts.model):
        b = _to(batch, _device_of(parts))
        feats = parts.features(b)
        a, v = feats["audio"], feats["visual"]
        if ablation == "feature":
            za, zv = torch.zeros_like(a), torch.zeros_like(v)
        else:
            zero = _zero_input_features(parts, b)
            za, zv = zero["audio"], zero["visual"]
        correct, prob = _coalitions(parts, a, v, za, zv, b["label"])
        index = _index(b, 0)
    correct_np, prob_np = correct.cpu().numpy(), prob.double().cpu().numpy()
    return ShapleyBatch(ablation, index.cpu().numpy(), b["label"].cpu().numpy().astype(np.int64),
                        {c: correct_np[i] for i, c in enumerate(COALITIONS)},
                        {c: prob_np[i] for i, c in enumerate(COALITIONS)})


def shapley_batch(parts: AVParts, batch: dict[str, Any]) -> ShapleyBatch:
    """Per-sample Shapley values, the POOLED FEATURE of a modality zeroed before the fused head
    (Wei et al., CVPR 2024, sample-level modality valuation). Encoders run once; the head once on
    the four stacked coalitions. Eval mode, no gradients, on the model's device."""
    return _shapley_batch(parts, batch, "feature")


def shapley_input_ablation(parts: AVParts, batch: dict[str, Any]) -> ShapleyBatch:
    """Per-sample Shapley values with a different ablation: the RAW INPUT of a modality zeroed and
    its encoder re-run (the zero input's feature is computed once per batch and broadcast).
    Same game and value functions as :func:`shapley_batch`."""
    return _shapley_batch(parts, batch, "input")


# --- OGM-GE and OPM ------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def ogm_coefficients(s_audio: float, s_visual: float, alpha: float = OGM_ALPHA) -> dict[str, dict[str, float]]:
    """OGM-GE (Peng, Wei et al., CVPR 2022) from the scores: ``{"rho": {...}, "coefficients": {...}}``.

    rho_v = s_v / s_a, rho_a = 1 / rho_v; if rho_v > 1: k_v = 1 - tanh(alpha * rho_v), k_a = 1;
    else k_a = 1 - tanh(alpha * rho_a), k_v = 1.
    """
    rho_v = _ratio(s_visual, s_audio)
    rho_a = math.inf if rho_v == 0 else 1.0 / rho_v  # 1 / inf = 0; NaN stays NaN
    if rho_v > 1:
        k_a, k_v = 1.0, 1.0 - math.tanh(alpha * rho_v)
    else:
        k_a, k_v = 1.0 - math.tanh(alpha * rho_a), 1.0
    return {"rho": {"audio": rho_a, "visual": rho_v}, "coefficients": {"audio": k_a, "visual": k_v}}


def opm_drop_probabilities(s_audio: float, s_visual: float, q_base: float = OPM_Q_BASE,
                           lam: float = OPM_LAMBDA) -> dict[str, dict[str, float]]:
    """OPM (Wei et al., TPAMI 2024): ``{"ratio": {m: r_m}, "drop_probability": {m: q_m}}`` with
    r_m = tanh(relu(s_m / s_other - 1)), q_m = clip(q_base * (1 + lam * r_m), 0, 1) if r_m > 0 else 0."""
    scores = {"audio": s_audio, "visual": s_visual}
    ratio, drop = {}, {}
    for m, other in (("audio", "visual"), ("visual", "audio")):
        rel = _ratio(scores[m], scores[other]) - 1.0
        r = math.tanh(max(rel, 0.0)) if not math.isnan(rel) else math.nan
        ratio[m] = r
        drop[m] = min(max(q_base * (1.0 + lam * r), 0.0), 1.0) if r > 0 else (math.nan if math.isnan(r) else 0.0)
    return {"ratio": ratio, "drop_probability": drop}


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalityContribution:
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
            input_mean = _jdict({"accuracy": self.shapley_input_mean_accuracy,
                                 "probability": self.shapley_input_mean_probability})
        return {"shapley_mean": _jdict({"accuracy": self.shapley_mean_accuracy,
                                        "probability": self.shapley_mean_probability}),
                "shapley_input_ablation_mean": input_mean,
                "unimodal_accuracy": _jf(self.unimodal_accuracy),
                "ogm": {"score": _jf(self.ogm_score)}}


@dataclass(frozen=True)
class OGMResult:
    """OGM-GE at the dataset level (scores summed over every sample) and per batch (mean of the
    per-batch coefficients; the authors modulate per mini-batch)."""

    alpha: float
    scores: dict[str, float]
    rho: dict[str, float]
    coefficients: dict[str, float]
    batch_mean_coefficients: dict[str, float]
    n_batches: int

    @property
    def dominant(self) -> str | None:
        """The modality OGM-GE would slow down (its coefficient below 1), None when balanced."""
        below = [m for m in MODALITIES if self.coefficients[m] < 1.0]
        return below[0] if below else None

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "scores": _jdict(self.scores), "rho": _jdict(self.rho),
                "coefficients": _jdict(self.coefficients),
                "batch_mean_coefficients": _jdict(self.batch_mean_coefficients),
                "dominant": self.dominant, "n_batches": self.n_batches,
                "level": "scores, rho and coefficients over the whole data; batch_mean_coefficients: "
                         "mean of the per-batch coefficients (the authors' per-batch rule)"}


@dataclass(frozen=True)
class OPMResult:
    q_base: float
    lam: float
    execute_probability: float  # the chance OPM acts on a batch at all; a parameter, not measured
    ratio: dict[str, float]
    drop_probability: dict[str, float]
    batch_mean_drop_probability: dict[str, float]

    def to_dict(self) -> dict:
        return {"q_base": self.q_base, "lambda": self.lam, "execute_probability": self.execute_probability,
                "ratio": _jdict(self.ratio), "drop_probability": _jdict(self.drop_probability),
                "batch_mean_drop_probability": _jdict(self.batch_mean_drop_probability)}


@dataclass(frozen=True)
class ModalityLearningState:
    """D&R learning state of one modality; held-out fields None when no held-out data was given."""

    modality: str
    purity_train: float | None
    n_train: int
    purity_heldout: float | None
    n_heldout: int
    lam: float
    reason: str | None = None  # why a purity is missing

    @property
    def state(self) -> LearningState | None:
        if self.purity_train is None or self.purity_heldout is None:
            return None
        return LearningState(self.modality, self.purity_train, self.purity_heldout, self.n_train, self.n_heldout)

    @property
    def gap(self) -> float | None:
        s = self.state
        return s.gap if s is not None else None

    @property
    def alpha(self) -> float | None:
        s = self.state
        return s.alpha(self.lam) if s is not None else None

    def to_dict(self) -> dict:
        s = self.state
        if s is not None:
            out = {k: (_jf(v) if isinstance(v, float) else v) for k, v in s.to_dict(self.lam).items()}
        else:
            out = {"purity_train": _jf(self.purity_train), "purity_heldout": _jf(self.purity_heldout),
                   "gap": None, "alpha": None, "n_train": self.n_train, "n_heldout": self.n_heldout}
        out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class LearningStateResult:
    lam: float
    k: int
    seed: int
    modalities: dict[str, ModalityLearningState]

    def to_dict(self) -> dict:
        return {"lambda": self.lam, "k": self.k, "seed": self.seed,
                **{m: s.to_dict() for m, s in self.modalities.items()}}


@dataclass(frozen=True)
class ModalityGap:
    """MMCSAL modality gap: Euclidean distance between the centroids of the L2-normalised pooled
    features of the two modalities."""

    distance: float | None
    n: int
    dims: dict[str, int]
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"distance": _jf(self.distance), "n": self.n, "dims": dict(self.dims), "reason": self.reason}


@dataclass
class ContributionResult:
    n_samples: int
    n_batches: int
    n_classes: int
    unimodal_source: str
    fused_accuracy: float
    empty_accuracy: float  # the all-zero coalition (head biases alone); not counted by v(empty) = 0
    empty_probability: float
    modalities: dict[str, ModalityContribution]
    ogm: OGMResult
    opm: OPMResult
    learning_state: LearningStateResult | None
    modality_gap: ModalityGap
    samples: dict[str, np.ndarray]  # per-sample columns, sorted by index (see samples_frame)

    def samples_frame(self) -> pd.DataFrame:
        """One row per sample: index, label, phi_{audio,visual}_{accuracy,probability} (and the
        ``_input`` columns of the input ablation), correctness and true-class probability of the
        fused, empty-coalition and uni-modal predictions."""
        return pd.DataFrame({k: v.copy() for k, v in self.samples.items()})

    def to_dict(self, samples: bool = False) -> dict:
        out = {"n_samples": self.n_samples, "n_batches": self.n_batches, "n_classes": self.n_classes,
               "unimodal_source": self.unimodal_source, "fused_accuracy": _jf(self.fused_accuracy),
               "empty_coalition": {"accuracy": _jf(self.empty_accuracy),
                                   "probability": _jf(self.empty_probability)},
               "shapley": {"removal": "pooled feature zeroed before the fused head",
                           "value": "v(S) = |S| * 1[correct] (accuracy) or |S| * softmax[y] (probability)",
                           "v_empty": V_EMPTY},
               "modalities": {m: c.to_dict() for m, c in self.modalities.items()},
               "ogm": self.ogm.to_dict(), "opm": self.opm.to_dict(),
               "learning_state": self.learning_state.to_dict() if self.learning_state else None,
               "modality_gap": self.modality_gap.to_dict()}
        if samples:
            out["samples"] = {k: _jlist(v) for k, v in self.samples.items()}
        return out


# --- partial results and their combination -------------------------------------------------------


_ROW_INT = ("index", "label")


@dataclass
class ContributionPartial:
    """Everything a shard contributes (see "Combining shards" in the module docstring)."""

    n_classes: int
    unimodal_source: str
    dims: dict[str, int]
    input_ablation: bool
    rows: dict[str, np.ndarray]  # per-sample columns, in loader order
    batch_scores: np.ndarray  # (n_batches, 3): s_audio, s_visual, batch size
    feature_sums: dict[str, np.ndarray]  # sum of L2-normalised pooled features per modality
    features: dict[str, np.ndarray] | None  # pooled features (float64), None when not kept
    heldout: dict[str, np.ndarray] | None = None  # "index", "label", "audio", "visual"

    @property
    def n(self) -> int:
        return int(len(self.rows["index"]))

    @classmethod
    def combine(cls, partials: Sequence[ContributionPartial]) -> ContributionPartial:
        """Concatenate rows, batch rows, features and held-out features; add the feature sums.
        ValueError when the shards disagree (classes, uni-modal source, options) or share an index."""
        if not partials:
            raise ValueError("nothing to combine")
        first = partials[0]
        for p in partials[1:]:
            for name in ("n_classes", "unimodal_source", "dims", "input_ablation"):
                if getattr(p, name) != getattr(first, name):
                    raise ValueError(f"shards disagree on {name}: {getattr(first, name)!r} vs {getattr(p, name)!r}")
            if (p.features is None) != (first.features is None) or (p.heldout is None) != (first.heldout is None):
                raise ValueError("shards disagree on whether features / held-out data were kept")
        index = np.concatenate([p.rows["index"] for p in partials])
        if len(np.unique(index)) != len(index):
            raise ValueError("shards share sample indices: shards must be disjoint (drop padded repeats)")
        if first.heldout is not None:
            h_index = np.concatenate([p.heldout["index"] for p in partials])
            if len(np.unique(h_index)) != len(h_index):
                raise ValueError("held-out shards share sample indices: they must be disjoint")
        cat = lambda dicts: {k: np.concatenate([d[k] for d in dicts]) for k in dicts[0]}  # noqa: E731
        return cls(first.n_classes, first.unimodal_source, dict(first.dims), first.input_ablation,
                   cat([p.rows for p in partials]),
                   np.concatenate([p.batch_scores for p in partials]).reshape(-1, 3),
                   {m: np.sum([p.feature_sums[m] for p in partials], axis=0) for m in MODALITIES},
                   cat([p.features for p in partials]) if first.features is not None else None,
                   cat([p.heldout for p in partials]) if first.heldout is not None else None)

    def to_dict(self) -> dict:
        arr = lambda d: None if d is None else {k: _jlist(v) for k, v in d.items()}  # noqa: E731
        return {"n_classes": self.n_classes, "unimodal_source": self.unimodal_source, "dims": dict(self.dims),
                "input_ablation": self.input_ablation, "rows": arr(self.rows),
                "batch_scores": [_jlist(r) for r in self.batch_scores],
                "feature_sums": arr(self.feature_sums),
                "features": None if self.features is None else
                {m: [_jlist(r) for r in x] for m, x in self.features.items() if m in MODALITIES}
                | {k: _jlist(self.features[k]) for k in _ROW_INT if k in self.features},
                "heldout": None if self.heldout is None else
                {m: [_jlist(r) for r in self.heldout[m]] for m in MODALITIES}
                | {k: _jlist(self.heldout[k]) for k in _ROW_INT}}

    @classmethod
    def from_dict(cls, d: dict) -> ContributionPartial:
        def col(name: str, values: list) -> np.ndarray:
            if name in _ROW_INT:
                return np.asarray(values, dtype=np.int64)
            if name.endswith("_correct"):
                return np.asarray(values, dtype=bool)
            return np.asarray(values, dtype=np.float64)

        def feats(x: dict | None, dims: dict[str, int]) -> dict[str, np.ndarray] | None:
            if x is None:
                return None
            out = {k: col(k, x[k]) for k in _ROW_INT if k in x}
            out.update({m: np.asarray(x[m], dtype=np.float64).reshape(-1, dims[m]) for m in MODALITIES})
            return out

        dims = {m: int(v) for m, v in d["dims"].items()}
        return cls(int(d["n_classes"]), d["unimodal_source"], dims, bool(d["input_ablation"]),
                   {k: col(k, v) for k, v in d["rows"].items()},
                   np.asarray(d["batch_scores"], dtype=np.float64).reshape(-1, 3),
                   {m: np.asarray(v, dtype=np.float64) for m, v in d["feature_sums"].items()},
                   feats(d["features"], dims), feats(d["heldout"], dims))

    def result(self, ogm_alpha: float = OGM_ALPHA, *, seed: int = 0, opm_q_base: float = OPM_Q_BASE,
               opm_lambda: float = OPM_LAMBDA, opm_execute_probability: float = OPM_EXECUTE_PROBABILITY,
               relearn_lambda: float = RELEARN_LAMBDA) -> ContributionResult:
        """The dataset-level result from the rows, sums and counts (rows sorted by index first)."""
        if self.n == 0:
            raise ValueError("no samples were measured")
        order = np.argsort(self.rows["index"], kind="stable")
        rows = {k: v[order] for k, v in self.rows.items()}
        n = len(order)
        mean = lambda col: float(np.sum(rows[col], dtype=np.float64) / n)  # noqa: E731
        scores = {m: float(np.sum(rows[f"uni_{m}_probability"], dtype=np.float64)) for m in MODALITIES}

        ogm = ogm_coefficients(scores["audio"], scores["visual"], ogm_alpha)
        opm = opm_drop_probabilities(scores["audio"], scores["visual"], opm_q_base, opm_lambda)
        per_batch_k = [ogm_coefficients(float(sa), float(sv), ogm_alpha)["coefficients"]
                       for sa, sv, _ in self.batch_scores]
        per_batch_q = [opm_drop_probabilities(float(sa), float(sv), opm_q_base, opm_lambda)["drop_probability"]
                       for sa, sv, _ in self.batch_scores]
        n_batches = len(self.batch_scores)
        batch_mean = lambda dicts: {m: float(np.mean([d[m] for d in dicts])) if dicts else math.nan  # noqa: E731
                                    for m in MODALITIES}

        modalities = {}
        for m in MODALITIES:
            inp = self.input_ablation
            modalities[m] = ModalityContribution(
                m, mean(f"phi_{m}_accuracy"), mean(f"phi_{m}_probability"),
                mean(f"phi_{m}_accuracy_input") if inp else None,
                mean(f"phi_{m}_probability_input") if inp else None,
                mean(f"uni_{m}_correct"), scores[m])

        return ContributionResult(
            n_samples=n, n_batches=n_batches, n_classes=self.n_classes, unimodal_source=self.unimodal_source,
            fused_accuracy=mean("fused_correct"), empty_accuracy=mean("empty_correct"),
            empty_probability=mean("empty_probability"), modalities=modalities,
            ogm=OGMResult(ogm_alpha, scores, ogm["rho"], ogm["coefficients"], batch_mean(per_batch_k), n_batches),
            opm=OPMResult(opm_q_base, opm_lambda, opm_execute_probability, opm["ratio"], opm["drop_probability"],
                          batch_mean(per_batch_q)),
            learning_state=self._learning_state(relearn_lambda, seed),
            modality_gap=self._modality_gap(n), samples=rows)

    def _learning_state(self, lam: float, seed: int) -> LearningStateResult | None:
        if self.features is None:
            return None
        k = self.n_classes

        def purity(data: dict[str, np.ndarray] | None, m: str) -> tuple[float | None, int, str | None]:
            if data is None:
                return None, 0, "no held-out data given"
            order = np.argsort(data["index"], kind="stable")
            n = len(order)
            if n < k:
                return None, n, f"{n} samples, fewer than k = {k} clusters"
            return cluster_purity(data[m][order], data["label"][order], k, seed=seed), n, None

        states = {}
        for m in MODALITIES:
            p_train, n_train, why_train = purity(self.features, m)
            p_held, n_held, why_held = purity(self.heldout, m)
            reasons = [r for r in (why_train and f"train: {why_train}", why_held and f"held-out: {why_held}") if r]
            states[m] = ModalityLearningState(m, p_train, n_train, p_held, n_held, lam,
                                              "; ".join(reasons) or None)
        return LearningStateResult(lam, k, seed, states)

    def _modality_gap(self, n: int) -> ModalityGap:
        if self.dims["audio"] != self.dims["visual"]:
            return ModalityGap(None, n, dict(self.dims),
                               f"feature sizes differ (audio {self.dims['audio']}, visual {self.dims['visual']})")
        centroid = {m: self.feature_sums[m] / n for m in MODALITIES}
        return ModalityGap(float(np.linalg.norm(centroid["audio"] - centroid["visual"])), n, dict(self.dims))


# --- the measurement pass ------------------------------------------------------------------------


def _pass(parts: AVParts, batches: Iterable[dict], device: torch.device, input_ablation: bool,
          keep_features: bool) -> dict[str, Any]:
    """Run every batch; per-batch results stay on the device until the end (no per-batch sync)."""
    cols: dict[str, list[torch.Tensor]] = {}
    batch_scores: list[torch.Tensor] = []
    feats_kept: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
    sums: dict[str, torch.Tensor] = {}
    n_classes = None
    dims: dict[str, int] = {}
    seen = 0

    def put(name: str, x: torch.Tensor) -> None:
        cols.setdefault(name, []).append(x)

    for raw in batches:
        b = _to(raw, device)
        label = b["label"].long()
        n = label.shape[0]
        put("index", _index(b, seen))
        put("label", label)
        seen += n
        feats = parts.features(b)
        a, v = feats["audio"], feats["visual"]
        dims = {"audio": int(a.shape[1]), "visual": int(v.shape[1])}
        correct, prob = _coalitions(parts, a, v, torch.zeros_like(a), torch.zeros_like(v), label)
        for i, c in enumerate(COALITIONS):
            put(f"c:{c}", correct[i])
            put(f"p:{c}", prob[i])
        if input_ablation:
            zero = _zero_input_features(parts, b)
            correct_i, prob_i = _coalitions(parts, a, v, zero["audio"], zero["visual"], label)
            for i, c in enumerate(COALITIONS):
                put(f"ci:{c}", correct_i[i])
                put(f"pi:{c}", prob_i[i])
        uni = parts.unimodal(a, v)
        s = []
        for m in MODALITIES:
            ok, p = _true_class(uni[m], label)
            put(f"uni_{m}_correct", ok)
            put(f"uni_{m}_probability", p)
            s.append(p.double().sum())
        n_classes = int(uni["audio"].shape[-1])
        batch_scores.append(torch.stack((*s, torch.tensor(float(n), dtype=torch.float64, device=device))))
        for m, f in (("audio", a), ("visual", v)):
            unit = F.normalize(f.double(), dim=1).sum(dim=0)
            sums[m] = unit if m not in sums else sums[m] + unit
            if keep_features:
                feats_kept[m].append(f.double())
    if not seen:
        raise ValueError("no batches to measure")
    host = {k: torch.cat(v).cpu().numpy() for k, v in cols.items()}
    return {"cols": host, "batch_scores": torch.stack(batch_scores).cpu().numpy(),
            "sums": {m: t.cpu().numpy() for m, t in sums.items()}, "n_classes": n_classes, "dims": dims,
            "features": {m: torch.cat(x).cpu().numpy() for m, x in feats_kept.items()} if keep_features else None}


def _rows(cols: dict[str, np.ndarray], input_ablation: bool) -> dict[str, np.ndarray]:
    rows: dict[str, np.ndarray] = {"index": cols["index"].astype(np.int64), "label": cols["label"].astype(np.int64)}
    variants = [("", "c", "p")] + ([("_input", "ci", "pi")] if input_ablation else [])
    for suffix, ck, pk in variants:
        correct = {c: cols[f"{ck}:{c}"] for c in COALITIONS}
        prob = {c: cols[f"{pk}:{c}"].astype(np.float64) for c in COALITIONS}
        for kind in ("accuracy", "probability"):
            phi = shapley_values(_values(kind, correct, prob))
            for m in MODALITIES:
                rows[f"phi_{m}_{kind}{suffix}"] = phi[m]
    rows["fused_correct"] = cols["c:audio+visual"].astype(bool)
    rows["fused_probability"] = cols["p:audio+visual"].astype(np.float64)
    rows["empty_correct"] = cols["c:empty"].astype(bool)
    rows["empty_probability"] = cols["p:empty"].astype(np.float64)
    for m in MODALITIES:
        rows[f"uni_{m}_correct"] = cols[f"uni_{m}_correct"].astype(bool)
        rows[f"uni_{m}_probability"] = cols[f"uni_{m}_probability"].astype(np.float64)
    return rows


def _heldout_features(parts: AVParts, batches: Iterable[dict], device: torch.device) -> dict[str, np.ndarray]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("index", "label", *MODALITIES)}
    seen = 0
    for raw in batches:
        b = _to(raw, device)
        out["index"].append(_index(b, seen))
        out["label"].append(b["label"].long())
        seen += b["label"].shape[0]
        feats = parts.features(b)
        for m in MODALITIES:
            out[m].append(feats[m].double())
    if not seen:
        raise ValueError("the held-out data has no batches")
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}


def contribution_partial(parts: AVParts, batches: Iterable[dict], device: torch.device | str,
                         heldout_batches: Iterable[dict] | None = None, *, input_ablation: bool = True,
                         keep_features: bool = True) -> ContributionPartial:
    """Measure one shard (eval mode, no gradients); combine shards with ContributionPartial.combine.

    ``input_ablation`` adds the raw-input-zeroed Shapley values (one extra encoder pass on a single
    zero sample per batch). ``keep_features=False`` skips the learning state (which needs every
    pooled feature; ``heldout_batches`` are then not read); the modality gap comes from running
    sums and is always computed. Empty ``batches`` or ``heldout_batches`` raise ValueError.
    """
    device = torch.device(device)
    parts.model.to(device)
    with _evaluating(parts.model):
        run = _pass(parts, batches, device, input_ablation, keep_features)
        heldout = _heldout_features(parts, heldout_batches, device) \
            if heldout_batches is not None and keep_features else None
    rows = _rows(run["cols"], input_ablation)
    features = None
    if keep_features:
        features = {"index": rows["index"], "label": rows["label"], **run["features"]}
    return ContributionPartial(run["n_classes"], parts.unimodal_source, run["dims"], input_ablation, rows,
                               run["batch_scores"].reshape(-1, 3), run["sums"], features, heldout)


def measure_contribution(parts: AVParts, batches: Iterable[dict], device: torch.device | str,
                         ogm_alpha: float = OGM_ALPHA, heldout_batches: Iterable[dict] | None = None,
                         seed: int = 0, *, input_ablation: bool = True, keep_features: bool = True,
                         opm_q_base: float = OPM_Q_BASE, opm_lambda: float = OPM_LAMBDA,
                         opm_execute_probability: float = OPM_EXECUTE_PROBABILITY,
                         relearn_lambda: float = RELEARN_LAMBDA) -> ContributionResult:
    """Shapley valuation (both value functions; feature and, by default, input ablation), OGM-GE,
    OPM, uni-modal and fused accuracies, learning state and modality gap over ``batches``.
    ``seed`` seeds the k-means of the learning state. Equal to
    ``contribution_partial(...).result(...)``."""
    partial = contribution_partial(parts, batches, device, heldout_batches, input_ablation=input_ablation,
                                   keep_features=keep_features)
    return partial.result(ogm_alpha, seed=seed, opm_q_base=opm_q_base, opm_lambda=opm_lambda,
                          opm_execute_probability=opm_execute_probability, relearn_lambda=relearn_lambda)


__all__ = [
    "ABLATIONS", "COALITIONS", "ContributionPartial", "ContributionResult", "LearningStateResult",
    "ModalityContribution", "ModalityGap", "ModalityLearningState", "OGMResult", "OPMResult", "ShapleyBatch",
    "contribution_partial", "measure_contribution", "ogm_coefficients", "opm_drop_probabilities",
    "shapley_batch", "shapley_input_ablation", "shapley_values",
]

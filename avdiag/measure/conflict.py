"""Gradient conflict between the multimodal and the uni-modal objectives of an audio-visual model.

What is measured, per mini-batch and per modality ``m`` (``g1 = g_mm``, ``g2 = g_m``):

* ``g_mm``: the gradient of ``CE(fused logits, y)`` and ``g_m``: the gradient of
  ``CE(uni-modal logits of m, y)`` (batch-mean cross-entropy, as in training), both with respect to
  ALL parameters of encoder ``m`` (every tensor of ``parts.encoders[m]``, BN affine parameters
  included), flattened and concatenated. ``cos = <g1, g2> / (|g1| |g2|)`` is the measure of
  MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
  ICML 2024); the batch *conflicts* when ``cos <= 0``. The uni-modal logits are those of
  :func:`avdiag.models.parts.av_parts` (trained uni-modal heads, slices of the fused linear head, or
  feature ablation; ``ConflictResult.unimodal_source`` says which).
* ``magnitude_ratio = |g_m| / |g_mm|`` (MMPareto reports the uni-modal gradient as the larger one).
* MMPareto's weights: under conflict the two-task min-norm (MGDA) solution
  ``a1 = clip((|g2|^2 - <g1, g2>) / |g1 - g2|^2, 0.001, 0.999)``, ``a2 = 1 - a1``; else
  ``(0.5, 0.5)``. MMPareto then sets, per parameter TENSOR ``t``, the gradient
  ``gamma * max(1, |g1_t + g2_t| / |g_hat_t|) * g_hat_t`` with ``g_hat = 2 a1 g1 + 2 a2 g2`` and
  ``gamma = 1.5`` (the authors' code: ``g1 + g2`` is the gradient of their summed loss on encoder
  ``m``). Reported: ``mmpareto_scale``, that factor for the whole flattened encoder, and
  ``mmpareto_tensor_scale``, the (min, max) of the per-tensor factors. Without conflict
  ``g_hat = g1 + g2`` and every factor is exactly ``gamma``.
* PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): when
  ``<g1, g2> < 0`` the multimodal gradient is projected off the uni-modal one,
  ``g_pc = g1 - <g1, g2> / |g2|^2 * g2``; reported ``pcgrad_norm = |g_pc|`` and
  ``pcgrad_cos = cos(g_pc, g1)`` (``|g1|`` and 1 when nothing is projected).
* Per layer: the same cosine restricted to the parameters of one MODULE, keyed by the module's
  qualified name in the model (``audio_net.layer1.0.conv1``, ``audio_net.layer1.0.bn1``: a BN
  layer's weight and bias together, a convolution's weight and bias together).
* Between the modalities, on the shared head: the cosine of the gradients of ``CE(out_a, y)`` and
  ``CE(out_v, y)`` with respect to the head parameter ELEMENTS that both uni-modal logits depend
  on. Dependence is probed once per run, at the current parameter values, with random features and
  random output weights: an element is shared when both probe gradients are non-zero there. For a
  concat head sliced into uni-modal logits only the bias is shared (the weight blocks are
  disjoint); for separate uni-modal heads (MMPareto, CRMT) or a sum head (``fc_x``/``fc_y``)
  nothing is: ``head_cos`` is then ``None`` and ``head_note`` says "no shared parameters".

Per sample: the encoder cosine above for every sample on its own,
``cos(grad CE_i(fused), grad CE_i(uni-modal m))``. This is the sample-level view of cross-modality
gradient harmonization (Wu et al., NeurIPS 2022), where a negative per-sample cosine marks a
conflicting, likely noisy or misaligned sample; ``ConflictResult.most_conflicting`` lists them by
dataset index. (Wu et al. take the cosine between two cross-modal alignment losses on shared
parameters; here the pair is the fused and the uni-modal classification loss on encoder ``m``.)
Per-sample gradients are taken with the model in EVAL mode (BatchNorm uses its running statistics),
so that samples are independent and a sample's gradient does not depend on the rest of its batch;
the per-batch figures follow ``train_mode``. Two exact engines:

* ``"hooks"`` (default where it applies): one batched forward with forward hooks on every module
  that owns encoder parameters (``Conv2d``, ``Linear``, eval-mode ``BatchNorm``), two batched
  backward passes to the module outputs (cotangents: the per-sample loss gradients at the pooled
  features), then per sample and module the inner products ``<G1_i, G2_i>``, ``|G1_i|^2``,
  ``|G2_i|^2`` of the per-sample weight gradients: for a convolution either by forming
  ``G_i = delta_i unfold(x_i)^T`` (on a CPU, from a few hundred positions per sample up, by one
  weight-only convolution backward per sample instead, which writes no im2col copy) or, when
  cheaper (small feature maps), without forming it, as
  ``sum_pq (delta1_p . delta2_q)(x_p . x_q)`` over positions ``p, q`` (Goodfellow's trick extended to
  convolutions). No per-sample gradient of the whole encoder is ever held; samples are processed in
  chunks sized by ``memory_bytes``. The visual encoder sees the ``T`` frames of a clip folded into
  its batch (``avdiag.models.av``): a sample's gradient is the sum over its frames.
* ``"vmap"``: ``torch.func.functional_call`` + ``vmap`` over ``vjp`` of the encoder, per-sample
  gradients materialised for a chunk of samples at a time. Used where the hooks engine does not
  apply (other parameterised module types, a module run twice); slower on CPU.

With ``per_sample=True`` and ``train_mode=False`` the per-batch figures come from the same passes
as the per-sample ones (the batch gradient is the sum of the per-sample gradients; where those are
never formed, a weight-only convolution backward). Cost: both engines do the work of one forward
and two backward passes per encoder plus the per-sample products, the same arithmetic as a loop of
batch-size-1 passes; what they save is the loop's per-call overhead, which is large on a GPU and
small on a CPU at full image sizes. Memory: the activations and two sets of module-output gradients
of a batch, plus ``memory_bytes`` of per-sample temporaries.

Aggregation (``measure_conflict``): ``cos_mean`` / ``cos_std`` (population std) /
``conflict_rate`` (share of batches with ``cos <= 0``) / ``magnitude_ratio_mean`` / per-layer mean
cosine are means over batches, each batch counting once whatever its size. Every summary is derived
from the per-batch records and the per-sample rows kept in the result, with ``math.fsum``
(correctly rounded, so independent of the order of summation). That is what makes results
reducible: a distributed run measures its shard on each rank, sends ``to_dict()`` (exact: finite
floats round-trip through JSON, non-finite ones are written "nan" / "inf" as elsewhere in avdiag),
rebuilds it with :meth:`ConflictResult.from_dict`, and :meth:`ConflictResult.combine` concatenates the per-batch records
(ordered by their first dataset index) and the per-sample rows (ordered by dataset index); the
summaries of the combined result equal, bit for bit, those of one run over all the batches.

The model is moved to ``device``; its train/eval flags, its buffers (BN running statistics, which a
``train_mode`` forward would update) and the ``requires_grad`` flags of its parameters (switched on
for the measurement) are restored afterwards. Parameter gradients (``.grad``) are not touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.measure.static import json_float
from avdiag.models.av import audio_features, visual_features
from avdiag.models.parts import AVParts

__all__ = [
    "BatchConflict", "ConflictResult", "ModalityConflict", "ModalitySummary", "SampleConflict",
    "MMPARETO_GAMMA", "measure_conflict", "mmpareto_weights",
]

MODALITIES = ("audio", "visual")
MMPARETO_GAMMA = 1.5
MMPARETO_CLIP = (0.001, 0.999)
DEFAULT_MEMORY_BYTES = 256 * 2**20  # per-sample temporaries per chunk
_DIRECT_MIN_POSITIONS = 256  # see _conv_products
NO_SHARED = "no shared parameters"
_F64 = torch.float64


# ---- scalar formulas --------------------------------------------------------------------------


def _num(v: Any) -> float:
    """A float from a JSON value (``json_float`` writes non-finite values as strings)."""
    return math.nan if v is None else float(v)


def _cos(dot: float, n1: float, n2: float) -> float:
    """Cosine from an inner product and two SQUARED norms; NaN when a vector is zero."""
    if not (n1 > 0 and n2 > 0):
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(n1 * n2)))


def mmpareto_weights(n1: float, dot: float, n2: float) -> tuple[float, float]:
    """MMPareto's loss weights (a1 for g1 = g_mm, a2 for g2 = g_m) from ``|g1|^2``, ``<g1, g2>``,
    ``|g2|^2``: the clipped two-vector min-norm solution when ``cos <= 0``, else (0.5, 0.5)."""
    if not _cos(dot, n1, n2) <= 0:
        return 0.5, 0.5
    a1 = (n2 - dot) / (n1 + n2 - 2.0 * dot)
    a1 = min(MMPARETO_CLIP[1], max(MMPARETO_CLIP[0], a1))
    return a1, 1.0 - a1


def _mmpareto_scale(n1: float, dot: float, n2: float, a1: float, a2: float, gamma: float) -> float:
    """``gamma * max(1, |g1 + g2| / |2 a1 g1 + 2 a2 g2|)`` from the squared norms and the inner product."""
    hat = 4.0 * (a1 * a1 * n1 + 2.0 * a1 * a2 * dot + a2 * a2 * n2)
    if not hat > 0:
        return gamma  # a zero combined gradient: the authors' division gives NaN and falls back to gamma
    return gamma * max(1.0, math.sqrt(max(n1 + 2.0 * dot + n2, 0.0) / hat))


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return math.fsum(xs) / len(xs) if xs else math.nan


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan
    mu = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / len(xs))


# ---- records ----------------------------------------------------------------------------------


@dataclass
class ModalityConflict:
    """MMPareto's figures for one encoder on one batch (g1 = g_mm, g2 = g_m)."""

    cos: float
    conflict: bool  # cos <= 0
    norm_multimodal: float  # |g_mm|
    norm_unimodal: float  # |g_m|
    magnitude_ratio: float  # |g_m| / |g_mm|
    weights: tuple[float, float]  # MMPareto (a1, a2)
    mmpareto_scale: float  # gamma * max(1, |g_sum| / |g_hat|), whole encoder
    mmpareto_tensor_scale: tuple[float, float]  # (min, max) of the per-tensor factors MMPareto applies
    pcgrad_norm: float  # |g_mm projected off g_m| (|g_mm| when not conflicting)
    pcgrad_cos: float  # cosine of the projected gradient with g_mm
    per_layer: dict[str, float]  # module name -> cosine over that module's parameters

    def to_dict(self) -> dict[str, Any]:
        return {"cos": json_float(self.cos), "conflict": self.conflict,
                "norm_multimodal": json_float(self.norm_multimodal), "norm_unimodal": json_float(self.norm_unimodal),
                "magnitude_ratio": json_float(self.magnitude_ratio),
                "weights": [json_float(w) for w in self.weights],
                "mmpareto_scale": json_float(self.mmpareto_scale),
                "mmpareto_tensor_scale": [json_float(s) for s in self.mmpareto_tensor_scale],
                "pcgrad_norm": json_float(self.pcgrad_norm), "pcgrad_cos": json_float(self.pcgrad_cos),
                "per_layer": {k: json_float(v) for k, v in self.per_layer.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModalityConflict":
        return cls(_num(d["cos"]), bool(d["conflict"]), _num(d["norm_multimodal"]), _num(d["norm_unimodal"]),
                   _num(d["magnitude_ratio"]), tuple(_num(w) for w in d["weights"]), _num(d["mmpareto_scale"]),
                   tuple(_num(s) for s in d["mmpareto_tensor_scale"]), _num(d["pcgrad_norm"]),
                   _num(d["pcgrad_cos"]), {k: _num(v) for k, v in d["per_layer"].items()})


@dataclass
class BatchConflict:
    """One mini-batch: batch-mean losses, per-modality conflict, and the head cosine."""

    position: int  # the batch's position in this run's iteration
    size: int
    first_index: int  # smallest dataset index in the batch (position-based count if batches carry no index)
    loss_multimodal: float
    loss_unimodal: dict[str, float]
    modalities: dict[str, ModalityConflict]
    head_cos: float | None  # None where the uni-modal logits share no head parameter

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "size": self.size, "first_index": self.first_index,
                "loss_multimodal": json_float(self.loss_multimodal),
                "loss_unimodal": {k: json_float(v) for k, v in self.loss_unimodal.items()},
                "modalities": {k: v.to_dict() for k, v in self.modalities.items()},
                "head_cos": None if self.head_cos is None else json_float(self.head_cos)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchConflict":
        return cls(int(d["position"]), int(d["size"]), int(d["first_index"]), _num(d["loss_multimodal"]),
                   {k: _num(v) for k, v in d["loss_unimodal"].items()},
                   {k: ModalityConflict.from_dict(v) for k, v in d["modalities"].items()},
                   None if d["head_cos"] is None else _num(d["head_cos"]))


@dataclass
class SampleConflict:
    """One sample's encoder cosines (eval mode); ``cos <= 0`` marks a conflicting sample."""

    index: int
    label: int
    cos_audio: float
    cos_visual: float

    def cos(self, modality: str) -> float:
        return self.cos_audio if modality == "audio" else self.cos_visual

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "cos_audio": json_float(self.cos_audio),
                "cos_visual": json_float(self.cos_visual)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleConflict":
        return cls(int(d["index"]), int(d["label"]), _num(d["cos_audio"]), _num(d["cos_visual"]))


@dataclass
class ModalitySummary:
    """One encoder over all batches (means over batches; ``sample_*`` over samples)."""

    modality: str
    batches: int
    cos_mean: float
    cos_std: float
    conflict_rate: float  # share of batches with cos <= 0
    magnitude_ratio_mean: float
    weight_multimodal_mean: float  # mean MMPareto a1
    mmpareto_scale_mean: float
    pcgrad_norm_mean: float
    pcgrad_cos_mean: float
    per_layer: dict[str, float]  # module -> mean cosine over batches
    cos_per_batch: list[float]
    samples: int
    sample_cos_mean: float
    sample_conflict_rate: float  # share of samples with cos <= 0
    most_conflicting: list[dict[str, Any]]  # lowest per-sample cosines: index, label, cos

    def to_dict(self) -> dict[str, Any]:
        d = {k: (json_float(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        d["per_layer"] = {k: json_float(v) for k, v in self.per_layer.items()}
        d["cos_per_batch"] = [json_float(v) for v in self.cos_per_batch]
        d["most_conflicting"] = [{**r, "cos": json_float(r["cos"])} for r in self.most_conflicting]
        return d


@dataclass
class ConflictResult:
    """Everything ``measure_conflict`` found: per-batch records, per-sample rows, and summaries
    derived from them. ``to_dict()`` is JSON-safe; :meth:`combine` merges per-rank results exactly."""

    unimodal_source: str  # "heads" / "slice" / "ablation"
    train_mode: bool  # mode of the per-batch gradients (per-sample ones are always eval)
    per_sample_method: str | None  # "hooks" / "vmap" / None (not measured)
    gamma: float
    head_shared: int  # head parameter elements both uni-modal logits depend on
    layers: dict[str, list[str]]  # modality -> module names of the per-layer breakdown
    batches: list[BatchConflict] = field(default_factory=list)
    samples: list[SampleConflict] = field(default_factory=list)
    top_k: int = 10

    @property
    def head_note(self) -> str:
        return NO_SHARED if self.head_shared == 0 else f"{self.head_shared} shared head parameters"

    @property
    def head_cos_mean(self) -> float | None:
        if self.head_shared == 0:
            return None
        return _mean([b.head_cos for b in self.batches if b.head_cos is not None])

    def most_conflicting(self, modality: str, k: int | None = None) -> list[SampleConflict]:
        """The ``k`` samples with the lowest cosine for ``modality`` (ties: lower dataset index first)."""
        rows = [s for s in self.samples if math.isfinite(s.cos(modality))]
        rows.sort(key=lambda s: (s.cos(modality), s.index))
        return rows[: self.top_k if k is None else k]

    def summary(self, modality: str) -> ModalitySummary:
        recs = [b.modalities[modality] for b in self.batches]
        cos = [r.cos for r in recs]
        finite = [c for c in cos if math.isfinite(c)]
        per_layer = {name: _mean([r.per_layer.get(name, math.nan) for r in recs]) for name in self.layers[modality]}
        scos = [s.cos(modality) for s in self.samples]
        sfinite = [c for c in scos if math.isfinite(c)]
        top = [{"index": s.index, "label": s.label, "cos": s.cos(modality)} for s in self.most_conflicting(modality)]
        return ModalitySummary(
            modality, len(recs), _mean(cos), _std(cos),
            (sum(c <= 0 for c in finite) / len(finite)) if finite else math.nan,
            _mean([r.magnitude_ratio for r in recs]), _mean([r.weights[0] for r in recs]),
            _mean([r.mmpareto_scale for r in recs]), _mean([r.pcgrad_norm for r in recs]),
            _mean([r.pcgrad_cos for r in recs]), per_layer, cos, len(scos), _mean(scos),
            (sum(c <= 0 for c in sfinite) / len(sfinite)) if sfinite else math.nan, top)

    @property
    def summaries(self) -> dict[str, ModalitySummary]:
        return {m: self.summary(m) for m in MODALITIES}

    def samples_frame(self):
        """The per-sample table as a pandas DataFrame: index, label, cos_audio, cos_visual."""
        import pandas as pd

        return pd.DataFrame([{"index": s.index, "label": s.label, "cos_audio": s.cos_audio,
                              "cos_visual": s.cos_visual} for s in self.samples],
                            columns=["index", "label", "cos_audio", "cos_visual"])

    def to_dict(self) -> dict[str, Any]:
        head_mean = self.head_cos_mean
        return {"unimodal_source": self.unimodal_source, "train_mode": self.train_mode,
                "per_sample_method": self.per_sample_method, "per_sample_mode": "eval", "gamma": self.gamma,
                "top_k": self.top_k,
                "head": {"shared_parameters": self.head_shared, "note": self.head_note,
                         "cos_mean": None if head_mean is None else json_float(head_mean)},
                "modalities": {m: s.to_dict() for m, s in self.summaries.items()},
                "layers": {m: list(v) for m, v in self.layers.items()},
                "batches": [b.to_dict() for b in self.batches],
                "samples": [s.to_dict() for s in self.samples]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConflictResult":
        """Rebuild a result from ``to_dict()`` output (e.g. sent from another rank)."""
        return cls(d["unimodal_source"], bool(d["train_mode"]), d["per_sample_method"], float(d["gamma"]),
                   int(d["head"]["shared_parameters"]), {m: list(v) for m, v in d["layers"].items()},
                   [BatchConflict.from_dict(b) for b in d["batches"]],
                   [SampleConflict.from_dict(s) for s in d["samples"]], int(d.get("top_k", 10)))

    @classmethod
    def combine(cls, parts: Sequence["ConflictResult"]) -> "ConflictResult":
        """Merge partial results (one per rank / shard): per-batch records and per-sample rows are
        concatenated in dataset order; every summary is recomputed from them, exactly."""
        if not parts:
            raise ValueError("combine needs at least one result")
        measured = [p for p in parts if p.batches] or list(parts[:1])  # a rank may have had no batch
        first = measured[0]
        for p in measured[1:]:
            same = (p.unimodal_source, p.train_mode, p.gamma, p.head_shared, p.layers)
            if same != (first.unimodal_source, first.train_mode, first.gamma, first.head_shared, first.layers):
                raise ValueError("cannot combine conflict results of different models or settings")
        methods = {m for p in parts if p.samples and p.per_sample_method for m in p.per_sample_method.split("+")}
        batches = sorted((b for p in parts for b in p.batches), key=lambda b: (b.first_index, b.position))
        samples = sorted((s for p in parts for s in p.samples), key=lambda s: s.index)
        return cls(first.unimodal_source, first.train_mode, "+".join(sorted(methods)) if methods else None,
                   first.gamma, first.head_shared, first.layers, batches, samples, first.top_k)


# ---- model bookkeeping ------------------------------------------------------------------------


@dataclass
class _Encoder:
    """Encoder ``m``'s parameters, grouped by owning module for the per-layer breakdown."""

    modality: str
    module: nn.Module
    names: list[str]  # parameter names relative to the encoder
    params: list[nn.Parameter]
    owners: list[int]  # parameter -> index into layers
    layers: list[str]  # qualified module names (in the model)
    modules: list[nn.Module]  # the module of each layer
    shares_parameters: bool = False  # a parameter owned by more than one module (hooks engine: no)


def _qualified_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name + "." if name else ""
    return ""


def _encoder_info(model: nn.Module, modality: str, enc: nn.Module) -> _Encoder:
    prefix = _qualified_prefix(model, enc)
    names, params, owners, layers, modules = [], [], [], [], []
    seen: set[int] = set()
    shares = False
    for mod_name, mod in enc.named_modules(remove_duplicate=False):
        direct = list(mod.named_parameters(recurse=False))
        own = [(n, p) for n, p in direct if id(p) not in seen]
        shares = shares or len(own) < len(direct)
        if not own:
            continue
        layers.append(prefix + mod_name if mod_name else prefix.rstrip(".") or modality)
        modules.append(mod)
        for n, p in own:
            seen.add(id(p))
            names.append(f"{mod_name}.{n}" if mod_name else n)
            params.append(p)
            owners.append(len(layers) - 1)
    return _Encoder(modality, enc, names, params, owners, layers, modules, shares)


class _Restore:
    """Saves train/eval flags, buffers (train_mode) and requires_grad flags; restores them on exit."""

    def __init__(self, model: nn.Module, save_buffers: bool):
        self.model = model
        self.training = [(m, m.training) for m in model.modules()]
        self.requires = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()] if save_buffers else []

    def __enter__(self) -> "_Restore":
        for p, _ in self.requires:
            p.requires_grad_(True)
        return self

    def reset_buffers(self) -> None:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)

    def __exit__(self, *exc) -> None:
        self.reset_buffers()
        for p, flag in self.requires:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


# ---- the head: losses, feature cotangents, shared parameters ----------------------------------


@dataclass
class _Head:
    losses: dict[str, float]  # "multimodal", "audio", "visual" (batch means)
    cot_mm: dict[str, torch.Tensor]  # dCE(fused)/d feature m  (B, d_m), batch-mean loss
    cot_uni: dict[str, torch.Tensor]  # dCE(uni m)/d feature m
    head_cos: float | None


def _head_pass(parts: AVParts, feats: dict[str, torch.Tensor], y: torch.Tensor,
               head_params: list[nn.Parameter], masks: list[torch.Tensor | None] | None) -> _Head:
    """Losses and their gradients at the pooled features (and, with ``masks``, the head cosine),
    on a graph of the head alone: the features are detached leaves."""
    a = feats["audio"].detach().requires_grad_(True)
    v = feats["visual"].detach().requires_grad_(True)
    fused = parts.fuse(a, v)
    uni = parts.unimodal(a, v)
    l_mm = F.cross_entropy(fused, y)
    l_uni = {m: F.cross_entropy(uni[m], y) for m in MODALITIES}
    cot_mm = dict(zip(MODALITIES, torch.autograd.grad(l_mm, [a, v], allow_unused=True, retain_graph=True)))
    hp = head_params if masks is not None else []
    ga = torch.autograd.grad(l_uni["audio"], [a] + hp, allow_unused=True, retain_graph=True)
    gv = torch.autograd.grad(l_uni["visual"], [v] + hp, allow_unused=True)
    leaves = {"audio": a, "visual": v}
    cot_uni = {"audio": ga[0], "visual": gv[0]}
    for d in (cot_mm, cot_uni):
        for m in MODALITIES:
            if d[m] is None:
                d[m] = torch.zeros_like(leaves[m])
    head_cos = None
    if masks is not None and any(mk is not None for mk in masks):
        acc = torch.zeros(3, dtype=_F64, device=y.device)
        for gx, gy, mk in zip(ga[1:], gv[1:], masks):
            if mk is None or gx is None or gy is None:
                continue
            acc += _stats3(gx[mk], gy[mk])
        dot, n1, n2 = acc.tolist()
        head_cos = _cos(dot, n1, n2)
    losses = {"multimodal": l_mm.detach(), **{m: l.detach() for m, l in l_uni.items()}}
    return _Head({k: float(v) for k, v in losses.items()}, cot_mm, cot_uni, head_cos)


def _shared_masks(parts: AVParts, head_params: list[nn.Parameter], feats: dict[str, torch.Tensor]
                  ) -> list[torch.Tensor | None]:
    """Per head tensor, the elements both uni-modal logits depend on (None: no such element)."""
    if not head_params:
        return []
    g = torch.Generator().manual_seed(0)
    probe = {m: torch.randn(4, feats[m].shape[1], generator=g).to(feats[m]) for m in MODALITIES}
    out = parts.unimodal(probe["audio"], probe["visual"])
    grads = {}
    for m in MODALITIES:
        w = torch.randn(out[m].shape, generator=g).to(out[m])
        grads[m] = torch.autograd.grad((out[m] * w).sum(), head_params, allow_unused=True, retain_graph=True)
    masks: list[torch.Tensor | None] = []
    for ga, gv in zip(grads["audio"], grads["visual"]):
        mk = None if ga is None or gv is None else (ga != 0) & (gv != 0)
        masks.append(mk if mk is not None and bool(mk.any()) else None)
    return masks


# ---- per-batch conflict -----------------------------------------------------------------------


def _tensor_stats(g1: Sequence[torch.Tensor | None], g2: Sequence[torch.Tensor | None],
                  params: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n_tensors, 3) float64: <g1, g2>, |g1|^2, |g2|^2 per parameter tensor."""
    rows = []
    for a, b, p in zip(g1, g2, params):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        rows.append(_stats3(a, b))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=_F64)


def _modality_conflict(stats: torch.Tensor, enc: _Encoder, gamma: float) -> ModalityConflict:
    per_tensor = stats.cpu().tolist()
    layer_sums = [[0.0, 0.0, 0.0] for _ in enc.layers]
    for (d, n1, n2), owner in zip(per_tensor, enc.owners):
        acc = layer_sums[owner]
        acc[0] += d
        acc[1] += n1
        acc[2] += n2
    dot, n1, n2 = (math.fsum(r[i] for r in per_tensor) for i in range(3))
    cos = _cos(dot, n1, n2)
    a1, a2 = mmpareto_weights(n1, dot, n2)
    tensor_scales = [_mmpareto_scale(t1, td, t2, a1, a2, gamma) for td, t1, t2 in per_tensor]
    if dot < 0 and n2 > 0:
        pc_norm = math.sqrt(max(n1 - dot * dot / n2, 0.0))
        pc_cos = pc_norm / math.sqrt(n1) if n1 > 0 else math.nan
    else:
        pc_norm, pc_cos = math.sqrt(n1), (1.0 if n1 > 0 else math.nan)
    return ModalityConflict(
        cos, bool(cos <= 0), math.sqrt(n1), math.sqrt(n2),
        math.sqrt(n2) / math.sqrt(n1) if n1 > 0 else math.nan, (a1, a2),
        _mmpareto_scale(n1, dot, n2, a1, a2, gamma),
        (min(tensor_scales), max(tensor_scales)) if tensor_scales else (math.nan, math.nan),
        pc_norm, pc_cos, {name: _cos(*s) for name, s in zip(enc.layers, layer_sums)})


# ---- per-sample: hooks engine -----------------------------------------------------------------


class _Unsupported(Exception):
    """The hooks engine cannot handle this encoder / call pattern: use the vmap engine."""


def _hookable(mod: nn.Module) -> bool:
    t = type(mod)
    if t is nn.Conv2d or (isinstance(mod, nn.Conv2d) and t.forward is nn.Conv2d.forward):
        return (mod.groups == 1 and mod.padding_mode == "zeros"
                and (not isinstance(mod.padding, str) or mod.padding == "valid"))
    if t is nn.Linear or (isinstance(mod, nn.Linear) and t.forward is nn.Linear.forward):
        return True
    bn = nn.modules.batchnorm._BatchNorm
    if isinstance(mod, bn) and t.forward is bn.forward:
        return mod.running_mean is not None and mod.running_var is not None
    return False


def _hooks_apply(enc: _Encoder) -> bool:
    return not enc.shares_parameters and all(_hookable(m) for m in enc.modules)


class _Capture:
    """Forward hooks recording (input, output) of every parameterised module of an encoder. The
    hook returns a clone of the output, so in-place ops downstream (``ReLU(inplace=True)``) leave
    the recorded output, the tensor differentiated against, intact."""

    def __init__(self, enc: _Encoder, stack: ExitStack):
        self.enc = enc
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in enc.modules]
        for i, mod in enumerate(enc.modules):
            handle = mod.register_forward_hook(self._hook(i))
            stack.callback(handle.remove)

    def _hook(self, i: int) -> Callable:
        def hook(_mod, inputs, output):
            self.calls[i].append((inputs[0].detach(), output))
            return output.clone()

        return hook

    def outputs(self) -> list[torch.Tensor]:
        if any(len(c) != 1 for c in self.calls):
            raise _Unsupported("a parameterised module ran more or less than once")
        return [c[0][1] for c in self.calls]


def _chunk(n: int, per_sample_floats: int, memory_bytes: int) -> int:
    return max(1, min(n, memory_bytes // max(1, 4 * per_sample_floats)))


def _gram3(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """(c, ...) pairs -> (c, 3) float64: <x1, x2>, |x1|^2, |x2|^2 per leading index (summed in the
    tensors' dtype, torch's cascade summation, then widened)."""
    x1, x2 = x1.flatten(1), x2.flatten(1)
    return torch.stack([(x1 * x2).sum(1), (x1 * x1).sum(1), (x2 * x2).sum(1)], 1).to(_F64)


class _BatchGrads:
    """Batch gradients of the encoder parameters rebuilt from per-sample ones: the per-sample
    cotangents were multiplied by powers of two (``_unit_rows``), so sample ``i``'s gradient is
    ``inv[i]`` times what the scaled pass gives; ``grads[id(param)] = (g1, g2)``."""

    def __init__(self, inv1: torch.Tensor, inv2: torch.Tensor):
        self.inv = (inv1, inv2)
        self.grads: dict[int, list[torch.Tensor | None]] = {}

    def add(self, param: torch.Tensor, per_sample1: torch.Tensor, per_sample2: torch.Tensor, start: int) -> None:
        """Accumulate sum_i inv[i] * per_sample[i] over the samples ``start .. start + len``."""
        acc = self.grads.setdefault(id(param), [None, None])
        for j, ps in enumerate((per_sample1, per_sample2)):
            w = self.inv[j][start:start + ps.shape[0]].to(ps.dtype)
            g = (w @ ps.reshape(ps.shape[0], -1)).reshape(param.shape)
            acc[j] = g if acc[j] is None else acc[j] + g

    def set(self, param: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> None:
        self.grads[id(param)] = [g1.reshape(param.shape), g2.reshape(param.shape)]

    def row_weights(self, j: int, rows_per_sample: int) -> torch.Tensor:
        return self.inv[j].repeat_interleave(rows_per_sample)


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 ** e`` for an integer tensor, exactly (built from the float64 bit pattern), in ``dtype``."""
    info = torch.finfo(dtype)
    lo, hi = math.ceil(math.log2(info.tiny)) + 1, math.floor(math.log2(info.max)) - 1
    bits = (e.to(torch.int64).clamp(lo, hi) + 1023) << 52
    return bits.view(torch.float64).to(dtype)


def _exponent(m: torch.Tensor) -> torch.Tensor:
    """Binary exponent e of m (m = f * 2**e, 0.5 <= f < 1); 0 where m is 0 or not finite."""
    e = torch.frexp(m).exponent
    return torch.where(torch.isfinite(m) & (m > 0), e, torch.zeros_like(e))


def _unit_rows(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``c`` by a power of two so that its largest |value| lies in [0.5, 1):
    (scaled rows, the inverse factors). Powers of two only shift exponents, so the backward passes
    from the scaled cotangents give exactly the scaled per-sample gradients, while the squares of
    the tiny gradients of well-fit (saturated) samples no longer underflow float32."""
    e = _exponent(c.detach().abs().reshape(c.shape[0], -1).amax(1))
    return c * _pow2(-e, c.dtype).view(-1, *[1] * (c.dim() - 1)), _pow2(e, torch.float64)


def _stats3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(3,) float64 <a, b>, |a|^2, |b|^2, computed on copies rescaled by one power of two (no
    underflow or overflow of the squares) and scaled back in float64."""
    m = torch.maximum(a.detach().abs().amax(), b.detach().abs().amax()) if a.numel() else a.new_zeros(())
    e = _exponent(m)
    s = _pow2(-e, a.dtype)
    a, b = a * s, b * s
    res = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).to(_F64)
    return res * _pow2(2 * e, _F64)


def _im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int]) -> torch.Tensor:
    """``F.unfold(x, kernel, dilation, padding, stride)``, (N, C*kh*kw, L), from strided windows
    (one copy; faster than ``F.unfold`` on CPU)."""
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    v = x.unfold(2, dilation[0] * (kernel[0] - 1) + 1, stride[0])
    if dilation[0] > 1:
        v = v[..., ::dilation[0]]
    v = v.unfold(3, dilation[1] * (kernel[1] - 1) + 1, stride[1])
    if dilation[1] > 1:
        v = v[..., ::dilation[1]]
    n, c, ho, wo = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kernel[0] * kernel[1], ho * wo)


def _conv_products(mod: nn.Conv2d, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, n: int,
                   memory_bytes: int, grads: _BatchGrads | None) -> torch.Tensor:
    """Per-sample products of a convolution; with ``grads``, its batch gradients go there too."""
    r = x.shape[0] // n  # rows (frames) per sample
    cout = d1.shape[1]
    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    length = r * d1.shape[2] * d1.shape[3]  # positions per sample
    ghost = length * length * (k + 3 * cout) < 2 * cout * k * length
    per_sample = k * length + (4 * length * length if ghost else 2 * cout * k) + 4 * cout * length
    c = _chunk(n, per_sample, memory_bytes)
    padding = (0, 0) if mod.padding == "valid" else mod.padding
    # on a CPU, per-sample weight gradients from one weight-only convolution backward per sample
    # beat im2col + bmm once a sample has a few hundred positions (no im2col copy to write)
    direct = not ghost and x.device.type == "cpu" and length >= _DIRECT_MIN_POSITIONS
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        m = e - s
        rows = torch.cat([d1[s * r:e * r], d2[s * r:e * r]], 1)
        dd = rows.reshape(m, r, 2 * cout, -1)
        if r > 1:
            dd = dd.transpose(1, 2)
        dd = dd.reshape(m, 2 * cout, length)  # (m, [delta1; delta2], positions)
        if direct:
            g = _direct_wgrads(mod, x[s * r:e * r], rows, r, padding)  # (m, 2 Cout, K)
        elif not ghost:
            g = torch.bmm(dd, _unfold(mod, x[s * r:e * r], m, r, padding).transpose(1, 2))
        if ghost:
            u = _unfold(mod, x[s * r:e * r], m, r, padding)
            gram_x = torch.bmm(u.transpose(1, 2), u)  # (m, L, L)
            g1, g2 = dd[:, :cout], dd[:, cout:]
            res = torch.stack([
                (torch.bmm(g1.transpose(1, 2), g2) * gram_x).sum((1, 2)),
                (torch.bmm(g1.transpose(1, 2), g1) * gram_x).sum((1, 2)),
                (torch.bmm(g2.transpose(1, 2), g2) * gram_x).sum((1, 2))], 1).to(_F64)
        else:  # g: (m, 2 Cout, K), the per-sample weight gradients
            res = _gram3(g[:, :cout], g[:, cout:])
            if grads is not None:
                grads.add(mod.weight, g[:, :cout], g[:, cout:], s)
        if mod.bias is not None:
            bias = dd.sum(2)
            res = res + _gram3(bias[:, :cout], bias[:, cout:])
            if grads is not None:
                grads.add(mod.bias, bias[:, :cout], bias[:, cout:], s)
        out.append(res)
    if grads is not None and ghost:  # batch weight gradients: one weight-only convolution backward
        w1, w2 = (grads.row_weights(j, r).to(d1.dtype).view(-1, 1, 1, 1) for j in (0, 1))
        wgrad = torch.ops.aten.convolution_backward(
            torch.cat([d1 * w1, d2 * w2], 1), x, torch.cat([mod.weight.detach(), mod.weight.detach()]), None,
            mod.stride, padding, mod.dilation, False, (0, 0), 1, (False, True, False))[1]
        grads.set(mod.weight, wgrad[:cout], wgrad[cout:])
    return torch.cat(out)


def _unfold(mod: nn.Conv2d, x: torch.Tensor, m: int, r: int, padding) -> torch.Tensor:
    """(m, K, positions): the im2col columns of ``m`` samples of ``r`` frames each."""
    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    u = _im2col(x, mod.kernel_size, mod.stride, padding, mod.dilation)
    if r > 1:
        u = u.reshape(m, r, k, -1).transpose(1, 2)
    return u.reshape(m, k, -1)


def _direct_wgrads(mod: nn.Conv2d, x: torch.Tensor, dd: torch.Tensor, r: int, padding) -> torch.Tensor:
    """(m, 2 Cout, K) per-sample weight gradients for the cotangents ``dd`` = [delta1; delta2]
    (rows of ``r`` frames per sample), one weight-only convolution backward per sample."""
    w2 = torch.cat([mod.weight.detach(), mod.weight.detach()])
    out = [torch.ops.aten.convolution_backward(dd[i:i + r], x[i:i + r], w2, None, mod.stride, padding, mod.dilation,
                                               False, (0, 0), 1, (False, True, False))[1]
           for i in range(0, x.shape[0], r)]
    return torch.stack(out).flatten(2)


def _linear_products(mod: nn.Linear, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, n: int,
                     memory_bytes: int, grads: _BatchGrads | None) -> torch.Tensor:
    x = x.reshape(n, -1, x.shape[-1])
    d1 = d1.reshape(n, -1, d1.shape[-1])
    d2 = d2.reshape(n, -1, d2.shape[-1])
    c = _chunk(n, 2 * d1.shape[2] * x.shape[2], memory_bytes)
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        g1 = torch.bmm(d1[s:e].transpose(1, 2), x[s:e])
        g2 = torch.bmm(d2[s:e].transpose(1, 2), x[s:e])
        res = _gram3(g1, g2)
        if grads is not None:
            grads.add(mod.weight, g1, g2, s)
        if mod.bias is not None:
            b1, b2 = d1[s:e].sum(1), d2[s:e].sum(1)
            res = res + _gram3(b1, b2)
            if grads is not None:
                grads.add(mod.bias, b1, b2, s)
        out.append(res)
    return torch.cat(out)


def _bn_products(mod: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                 n: int, grads: _BatchGrads | None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
    dims = tuple(range(2, x.dim()))

    def per_sample(t: torch.Tensor) -> torch.Tensor:  # (rows, C, ...) -> (n, C)
        t = t.sum(dims) if dims else t
        return t.reshape(n, -1, t.shape[1]).sum(1)

    res = torch.zeros(n, 3, dtype=_F64, device=x.device)
    for param, pair in ((mod.weight, lambda: (d1 * xhat, d2 * xhat)), (mod.bias, lambda: (d1, d2))):
        if param is None:
            continue
        q1, q2 = (per_sample(t) for t in pair())
        res = res + _gram3(q1, q2)
        if grads is not None:
            grads.add(param, q1, q2, 0)
    return res


def _hooks_products(enc: _Encoder, cap: _Capture, deltas1: Sequence[torch.Tensor | None],
                    deltas2: Sequence[torch.Tensor | None], n: int, memory_bytes: int,
                    grads: _BatchGrads | None = None) -> torch.Tensor:
    """(n, 3) float64 per-sample <g1_i, g2_i>, |g1_i|^2, |g2_i|^2 over the whole encoder; with
    ``grads``, the batch gradients of every encoder parameter are gathered there too."""
    total = None
    for mod, calls, d1, d2 in zip(enc.modules, cap.calls, deltas1, deltas2):
        x, out = calls[0]
        d1 = torch.zeros_like(out) if d1 is None else d1
        d2 = torch.zeros_like(out) if d2 is None else d2
        if x.shape[0] % n:
            raise _Unsupported("a module's batch is not a multiple of the number of samples")
        if isinstance(mod, nn.Conv2d):
            res = _conv_products(mod, x, d1, d2, n, memory_bytes, grads)
        elif isinstance(mod, nn.Linear):
            res = _linear_products(mod, x, d1, d2, n, memory_bytes, grads)
        else:
            res = _bn_products(mod, x, d1, d2, n, grads)
        total = res if total is None else total + res
    return total if total is not None else torch.zeros(n, 3, dtype=_F64)


# ---- per-sample: torch.func engine ------------------------------------------------------------


class _Features(nn.Module):
    """Encoder ``m`` plus the pooling of :mod:`avdiag.models.av`, as one module for functional_call."""

    def __init__(self, enc: nn.Module, modality: str):
        super().__init__()
        self.enc = enc
        self.fn = audio_features if modality == "audio" else visual_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.enc, x)


def _vmap_products(enc: _Encoder, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                   memory_bytes: int) -> torch.Tensor:
    """(n, 3) float64 per-sample products with per-sample gradients from vmap(vjp) (eval mode)."""
    wrapper = _Features(enc.module, enc.modality)
    params = {"enc." + name: p.detach() for name, p in zip(enc.names, enc.params)}

    def one(p, xi, ui, wi):
        _, pull = torch.func.vjp(lambda q: torch.func.functional_call(wrapper, q, (xi.unsqueeze(0),)), p)
        g1 = pull(ui.unsqueeze(0))[0]
        g2 = pull(wi.unsqueeze(0))[0]
        acc = torch.zeros(3, dtype=_F64, device=xi.device)
        for k in p:
            a, b = g1[k], g2[k]
            acc = acc + torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).to(_F64)
        return acc

    batched = torch.func.vmap(one, in_dims=(None, 0, 0, 0))
    n_params = sum(p.numel() for p in enc.params)
    c = _chunk(x.shape[0], 3 * n_params, memory_bytes)
    return torch.cat([batched(params, x[s:s + c], c1[s:s + c], c2[s:s + c]) for s in range(0, x.shape[0], c)])


def _sample_cos(prod: torch.Tensor) -> list[float]:
    return [_cos(d, n1, n2) for d, n1, n2 in prod.cpu().tolist()]


# ---- the measurement --------------------------------------------------------------------------


def _batch_inputs(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    missing = [m for m in MODALITIES if m not in batch]
    if missing:
        raise ValueError(f"conflict needs both modalities; the batch has no {', '.join(missing)}")
    inputs = {m: torch.as_tensor(batch[m]).to(device, non_blocking=True) for m in MODALITIES}
    y = torch.as_tensor(batch["label"]).to(device).long()
    return inputs, y


def measure_conflict(parts: AVParts, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
                     per_sample: bool = True, train_mode: bool = False, *, method: str = "auto",
                     gamma: float = MMPARETO_GAMMA, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                     top_k: int = 10) -> ConflictResult:
    """MMPareto / PCGrad / head / per-sample gradient conflict of ``parts`` over ``batches``.

    ``batches``: dicts with ``audio`` (B, F, T), ``visual`` (B, 3, T, H, W), ``label`` (B,) and,
    ideally, ``index`` (B,) dataset indices (else positions in the iteration are used).
    ``train_mode``: the per-batch gradients with BatchNorm in train mode (batch statistics, as in a
    training step; the running statistics are restored afterwards); per-sample gradients are always
    taken in eval mode. ``method``: per-sample engine, ``"auto"`` (hooks where they apply, else
    vmap), ``"hooks"`` or ``"vmap"``. ``memory_bytes`` bounds the per-sample temporaries of a chunk.
    """
    if method not in ("auto", "hooks", "vmap"):
        raise ValueError(f"method must be auto, hooks or vmap, got {method!r}")
    device = torch.device(device)
    model = parts.model.to(device)
    encs = {m: _encoder_info(model, m, parts.encoders[m]) for m in MODALITIES}
    enc_ids = {id(p) for e in encs.values() for p in e.params}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids]
    hooks_ok = all(_hooks_apply(e) for e in encs.values())
    if method == "hooks" and not hooks_ok:
        raise ValueError("the hooks engine needs encoders built from Conv2d / Linear / eval-mode BatchNorm")
    engine = ("hooks" if hooks_ok else "vmap") if method == "auto" else method
    result = ConflictResult(parts.unimodal_source, bool(train_mode), engine if per_sample else None, gamma, 0,
                            {m: list(e.layers) for m, e in encs.items()}, top_k=top_k)
    masks: list[torch.Tensor | None] | None = None
    methods: set[str] = set()
    seen = 0
    with _Restore(model, save_buffers=train_mode) as restore, torch.enable_grad():
        for position, batch in enumerate(batches):
            inputs, y = _batch_inputs(batch, device)
            n = int(y.shape[0])
            index = batch.get("index")
            index = torch.as_tensor(index).long().tolist() if index is not None else list(range(seen, seen + n))
            seen += n
            shared = per_sample and not train_mode and engine == "hooks"
            try:
                record, samples = _measure_batch(parts, encs, inputs, y, head_params, masks, train_mode, shared,
                                                 gamma, memory_bytes)
            except _Unsupported:  # e.g. a module run twice: per-sample gradients from the vmap engine
                shared = False
                record, samples = _measure_batch(parts, encs, inputs, y, head_params, masks, train_mode, False,
                                                 gamma, memory_bytes)
            restore.reset_buffers()  # undo the running-statistics update of a train-mode forward
            if masks is None:
                masks = record.pop("masks")
                result.head_shared = int(sum(int(mk.sum()) for mk in masks if mk is not None))
            if per_sample:
                if shared:
                    methods.add("hooks")
                else:
                    samples, used = _per_sample_only(parts, encs, inputs, y, engine, memory_bytes)
                    methods.add(used)
                result.samples.extend(SampleConflict(i, lab, ca, cv) for i, lab, ca, cv
                                      in zip(index, y.tolist(), samples["audio"], samples["visual"]))
            result.batches.append(BatchConflict(
                position, n, min(index) if index else seen - n, record["losses"]["multimodal"],
                {m: record["losses"][m] for m in MODALITIES}, record["modalities"], record["head_cos"]))
    if per_sample:
        result.per_sample_method = "+".join(sorted(methods)) if methods else engine
    result.samples.sort(key=lambda s: s.index)
    return result


def _measure_batch(parts: AVParts, encs: dict[str, _Encoder], inputs: dict[str, torch.Tensor], y: torch.Tensor,
                   head_params: list[nn.Parameter], masks, train_mode: bool, with_samples: bool, gamma: float,
                   memory_bytes: int) -> tuple[dict[str, Any], dict[str, list[float]] | None]:
    """Per-batch figures; with ``with_samples`` (eval mode, hooks engine) the per-sample cosines
    from the same forward and backward passes."""
    parts.model.train(train_mode)
    with ExitStack() as stack:
        caps = {m: _Capture(e, stack) for m, e in encs.items()} if with_samples else None
        feats = parts.features(inputs)
        if caps is not None:
            stack.close()  # hooks off before the head runs
        new_masks = _shared_masks(parts, head_params, feats) if masks is None else masks
        head = _head_pass(parts, feats, y, head_params, new_masks)
    record: dict[str, Any] = {"losses": head.losses, "head_cos": head.head_cos, "modalities": {}}
    if masks is None:
        record["masks"] = new_masks
    samples = {} if with_samples else None
    for m, enc in encs.items():
        # with hooks: gradients at the module outputs only; the parameter gradients of the batch
        # are the sums of the per-sample ones (or, where those are never formed, a weight-only
        # convolution backward), so autograd computes no weight gradient twice
        if caps is not None:
            (c1, inv1), (c2, inv2) = _unit_rows(head.cot_mm[m]), _unit_rows(head.cot_uni[m])
            outs = caps[m].outputs()
            d1 = torch.autograd.grad(feats[m], outs, c1, retain_graph=True, allow_unused=True)
            d2 = torch.autograd.grad(feats[m], outs, c2, allow_unused=True)
            grads = _BatchGrads(inv1, inv2)
            samples[m] = _sample_cos(_hooks_products(enc, caps[m], d1, d2, int(y.shape[0]), memory_bytes, grads))
            del d1, d2
            g1 = [grads.grads[id(p)][0] for p in enc.params]
            g2 = [grads.grads[id(p)][1] for p in enc.params]
        else:
            g1 = torch.autograd.grad(feats[m], enc.params, head.cot_mm[m], retain_graph=True, allow_unused=True)
            g2 = torch.autograd.grad(feats[m], enc.params, head.cot_uni[m], allow_unused=True)
        record["modalities"][m] = _modality_conflict(_tensor_stats(g1, g2, enc.params), enc, gamma)
        del g1, g2
    return record, samples


def _per_sample_only(parts: AVParts, encs: dict[str, _Encoder], inputs: dict[str, torch.Tensor], y: torch.Tensor,
                     engine: str, memory_bytes: int) -> tuple[dict[str, list[float]], str]:
    """Per-sample encoder cosines in eval mode, on their own passes; also the engine used."""
    parts.model.eval()
    n = int(y.shape[0])
    out: dict[str, list[float]] = {}
    if engine == "hooks":
        try:
            with ExitStack() as stack:
                caps = {m: _Capture(e, stack) for m, e in encs.items()}
                feats = parts.features(inputs)
            head = _head_pass(parts, feats, y, [], None)
            for m, enc in encs.items():
                outs = caps[m].outputs()
                c1, c2 = _unit_rows(head.cot_mm[m])[0], _unit_rows(head.cot_uni[m])[0]
                d1 = torch.autograd.grad(feats[m], outs, c1, retain_graph=True, allow_unused=True)
                d2 = torch.autograd.grad(feats[m], outs, c2, allow_unused=True)
                out[m] = _sample_cos(_hooks_products(enc, caps[m], d1, d2, n, memory_bytes))
            return out, "hooks"
        except _Unsupported:
            out = {}
    with torch.no_grad():
        feats = parts.features(inputs)
    head = _head_pass(parts, feats, y, [], None)
    for m, enc in encs.items():
        c1, c2 = _unit_rows(head.cot_mm[m].detach())[0], _unit_rows(head.cot_uni[m].detach())[0]
        out[m] = _sample_cos(_vmap_products(enc, inputs[m], c1, c2, memory_bytes))
    return out, "vmap"

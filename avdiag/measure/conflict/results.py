"""What the conflict measure returns: per-batch records, per-sample rows, and the summaries derived
from them. Every summary is computed from the records with ``math.fsum`` (correctly rounded, so it
does not depend on the order of summation): that is what lets :meth:`GradientConflict.combine`
merge shards exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from avdiag.results import json_safe

MODALITIES = ("audio", "visual")
NO_SHARED = "no shared parameters"
SAMPLE_COLUMNS = ["index", "label", "cos_audio", "cos_visual"]


def read_float(v: Any) -> float:
    """A float from a JSON value: null (a non-finite float on the way out) reads back as NaN."""
    return math.nan if v is None else float(v)


def finite_mean(xs: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there is none), correctly rounded."""
    xs = [x for x in xs if math.isfinite(x)]
    return math.fsum(xs) / len(xs) if xs else math.nan


def finite_std(xs: Sequence[float]) -> float:
    """Population standard deviation of the finite values (NaN when there is none)."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan
    mu = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / len(xs))


def share_at_most_zero(xs: Sequence[float]) -> float:
    """Share of the finite values that are <= 0 (NaN when there is none)."""
    xs = [x for x in xs if math.isfinite(x)]
    return sum(x <= 0 for x in xs) / len(xs) if xs else math.nan


@dataclass
class BatchModalityConflict:
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
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchModalityConflict":
        return cls(read_float(d["cos"]), bool(d["conflict"]), read_float(d["norm_multimodal"]),
                   read_float(d["norm_unimodal"]), read_float(d["magnitude_ratio"]),
                   tuple(read_float(w) for w in d["weights"]), read_float(d["mmpareto_scale"]),
                   tuple(read_float(s) for s in d["mmpareto_tensor_scale"]), read_float(d["pcgrad_norm"]),
                   read_float(d["pcgrad_cos"]), {k: read_float(v) for k, v in d["per_layer"].items()})


@dataclass
class BatchConflict:
    """One mini-batch: batch-mean losses, per-modality conflict, and the head cosine."""

    position: int  # the batch's position in this run's iteration
    size: int
    first_index: int  # smallest dataset index in the batch (position-based count if batches carry no index)
    loss_multimodal: float
    loss_unimodal: dict[str, float]
    modalities: dict[str, BatchModalityConflict]
    head_cos: float | None  # None where the uni-modal logits share no head parameter

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"position": self.position, "size": self.size, "first_index": self.first_index,
                          "loss_multimodal": self.loss_multimodal, "loss_unimodal": self.loss_unimodal,
                          "modalities": {k: v.to_dict() for k, v in self.modalities.items()},
                          "head_cos": self.head_cos})

    @classmethod
    def from_dict(cls, d: dict[str, Any], shared_head: bool = True) -> "BatchConflict":
        """``shared_head``: whether the head has shared parameters; a null ``head_cos`` is then a
        non-finite cosine (NaN), otherwise the absence of one (None)."""
        head_cos = read_float(d["head_cos"]) if shared_head else None
        return cls(int(d["position"]), int(d["size"]), int(d["first_index"]), read_float(d["loss_multimodal"]),
                   {k: read_float(v) for k, v in d["loss_unimodal"].items()},
                   {k: BatchModalityConflict.from_dict(v) for k, v in d["modalities"].items()}, head_cos)


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
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleConflict":
        return cls(int(d["index"]), int(d["label"]), read_float(d["cos_audio"]), read_float(d["cos_visual"]))


@dataclass
class ModalityConflict:
    """One encoder over all batches (means over batches, each batch counting once; ``sample_*`` over
    samples). Derived from a :class:`GradientConflict`; combine the results, not the summaries."""

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
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModalityConflict":
        floats = {k: read_float(d[k]) for k in ("cos_mean", "cos_std", "conflict_rate", "magnitude_ratio_mean",
                                                 "weight_multimodal_mean", "mmpareto_scale_mean", "pcgrad_norm_mean",
                                                 "pcgrad_cos_mean", "sample_cos_mean", "sample_conflict_rate")}
        worst = [{"index": int(r["index"]), "label": int(r["label"]), "cos": read_float(r["cos"])}
                 for r in d["most_conflicting"]]
        return cls(modality=d["modality"], batches=int(d["batches"]), samples=int(d["samples"]),
                   per_layer={k: read_float(v) for k, v in d["per_layer"].items()},
                   cos_per_batch=[read_float(v) for v in d["cos_per_batch"]], most_conflicting=worst, **floats)


def merged_methods(values: Sequence[str | None]) -> str | None:
    """Methods named by several shards (each possibly "a+b"), sorted and joined by "+"."""
    names = sorted({m for v in values if v for m in v.split("+")})
    return "+".join(names) if names else None


@dataclass
class EngineReport:
    """How the per-sample products were computed: the engine of each encoder, the method chosen per
    layer with the trial times that chose it (seconds per sample), the memory budget, the measured
    activation memory of one sample and the chunk size it allowed."""

    per_sample: dict[str, str]  # modality -> "hooks" / "vmap" / "loop" / "sketch"
    layers: dict[str, str]  # layer -> method ("a+b" when shards or batches chose differently)
    trials: dict[str, dict[str, float]]  # layer -> method -> seconds per sample in the trial
    memory_budget: int  # bytes
    per_sample_bytes: int | None  # measured activation memory of one sample
    chunk_size: int | None  # samples per chunk (largest used)
    amp: str | None = None  # autocast dtype, None in full float32

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineReport":
        return cls(dict(d["per_sample"]), dict(d["layers"]),
                   {k: {m: read_float(t) for m, t in v.items()} for k, v in d["trials"].items()},
                   int(d["memory_budget"]), None if d["per_sample_bytes"] is None else int(d["per_sample_bytes"]),
                   None if d["chunk_size"] is None else int(d["chunk_size"]), d.get("amp"))

    @classmethod
    def combine(cls, reports: Sequence["EngineReport"]) -> "EngineReport":
        first = reports[0]
        keys = lambda attr: sorted({k for r in reports for k in getattr(r, attr)})  # noqa: E731
        largest = lambda attr: max((getattr(r, attr) for r in reports if getattr(r, attr) is not None),  # noqa: E731
                                   default=None)
        trials = {}
        for r in reports:
            for layer, times in r.trials.items():
                trials.setdefault(layer, times)
        return cls({m: merged_methods([r.per_sample.get(m) for r in reports]) for m in keys("per_sample")},
                   {k: merged_methods([r.layers.get(k) for r in reports]) for k in keys("layers")},
                   trials, first.memory_budget, largest("per_sample_bytes"), largest("chunk_size"), first.amp)


@dataclass
class SketchReport:
    """The approximate mode's settings and its error, measured on the run's own first samples: the
    sketched cosines against the exact ones (both modalities; ``checked`` pairs compared)."""

    dim: int  # numbers per layer
    seed: int
    checked: int
    max_abs_error: float
    mean_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SketchReport":
        return cls(int(d["dim"]), int(d["seed"]), int(d["checked"]), read_float(d["max_abs_error"]),
                   read_float(d["mean_abs_error"]))

    @classmethod
    def combine(cls, reports: Sequence["SketchReport"]) -> "SketchReport":
        checked = sum(r.checked for r in reports)
        total = math.fsum(r.mean_abs_error * r.checked for r in reports if r.checked)
        return cls(reports[0].dim, reports[0].seed, checked,
                   max((r.max_abs_error for r in reports if r.checked), default=math.nan),
                   total / checked if checked else math.nan)


@dataclass
class GradientConflict:
    """Everything the conflict measure found: per-batch records, per-sample rows, and summaries
    derived from them. ``to_dict()`` is JSON-safe (non-finite floats are null) and ``from_dict`` its
    inverse; :meth:`combine` merges the results of disjoint shards exactly."""

    unimodal_source: str  # "heads" / "slice" / "ablation"
    train_mode: bool  # mode of the per-batch gradients (per-sample ones are always eval)
    per_sample_method: str | None  # "hooks" / "vmap" / "loop" / "sketch" (joined by "+" when several) / None
    gamma: float
    head_shared: int  # head parameter elements both uni-modal logits depend on
    layers: dict[str, list[str]]  # modality -> module names of the per-layer breakdown
    batches: list[BatchConflict] = field(default_factory=list)
    samples: list[SampleConflict] = field(default_factory=list)
    top_k: int = 10
    engine: EngineReport | None = None  # how the per-sample products were computed
    sketch: SketchReport | None = None  # set when the per-sample cosines are approximate

    @property
    def head_note(self) -> str:
        return NO_SHARED if self.head_shared == 0 else f"{self.head_shared} shared head parameters"

    @property
    def head_cos_mean(self) -> float | None:
        if self.head_shared == 0:
            return None
        return finite_mean([b.head_cos for b in self.batches if b.head_cos is not None])

    def most_conflicting(self, modality: str, k: int | None = None) -> list[SampleConflict]:
        """The ``k`` samples with the lowest cosine for ``modality`` (ties: lower dataset index first)."""
        rows = [s for s in self.samples if math.isfinite(s.cos(modality))]
        rows.sort(key=lambda s: (s.cos(modality), s.index))
        return rows[: self.top_k if k is None else k]

    def summary(self, modality: str) -> ModalityConflict:
        recs = [b.modalities[modality] for b in self.batches]
        cos = [r.cos for r in recs]
        per_layer = {name: finite_mean([r.per_layer.get(name, math.nan) for r in recs])
                     for name in self.layers[modality]}
        sample_cos = [s.cos(modality) for s in self.samples]
        top = [{"index": s.index, "label": s.label, "cos": s.cos(modality)} for s in self.most_conflicting(modality)]
        return ModalityConflict(
            modality, len(recs), finite_mean(cos), finite_std(cos), share_at_most_zero(cos),
            finite_mean([r.magnitude_ratio for r in recs]), finite_mean([r.weights[0] for r in recs]),
            finite_mean([r.mmpareto_scale for r in recs]), finite_mean([r.pcgrad_norm for r in recs]),
            finite_mean([r.pcgrad_cos for r in recs]), per_layer, cos, len(sample_cos), finite_mean(sample_cos),
            share_at_most_zero(sample_cos), top)

    @property
    def summaries(self) -> dict[str, ModalityConflict]:
        return {m: self.summary(m) for m in MODALITIES}

    def to_frame(self):
        """The per-sample table as a pandas DataFrame: index, label, cos_audio, cos_visual."""
        import pandas as pd

        return pd.DataFrame([asdict(s) for s in self.samples], columns=SAMPLE_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "unimodal_source": self.unimodal_source, "train_mode": self.train_mode,
            "per_sample_method": self.per_sample_method, "per_sample_mode": "eval",
            "per_sample_exact": self.sketch is None, "gamma": self.gamma, "top_k": self.top_k,
            "engine": self.engine.to_dict() if self.engine is not None else None,
            "sketch": self.sketch.to_dict() if self.sketch is not None else None,
            "head": {"shared_parameters": self.head_shared, "note": self.head_note, "cos_mean": self.head_cos_mean},
            "modalities": {m: s.to_dict() for m, s in self.summaries.items()},
            "layers": self.layers,
            "batches": [b.to_dict() for b in self.batches],
            "samples": [s.to_dict() for s in self.samples]})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GradientConflict":
        """Rebuild a result from ``to_dict()`` output (e.g. sent from another rank); the summaries
        are derived again from the records."""
        shared = int(d["head"]["shared_parameters"])
        return cls(d["unimodal_source"], bool(d["train_mode"]), d["per_sample_method"], float(d["gamma"]), shared,
                   {m: list(v) for m, v in d["layers"].items()},
                   [BatchConflict.from_dict(b, shared_head=shared > 0) for b in d["batches"]],
                   [SampleConflict.from_dict(s) for s in d["samples"]], int(d.get("top_k", 10)),
                   EngineReport.from_dict(d["engine"]) if d.get("engine") else None,
                   SketchReport.from_dict(d["sketch"]) if d.get("sketch") else None)

    @classmethod
    def combine(cls, parts: Sequence["GradientConflict"]) -> "GradientConflict":
        """Merge partial results (one per rank / shard): per-batch records (ordered by their first
        dataset index) and per-sample rows (by dataset index) are concatenated; every summary is
        then derived from them, equal bit for bit to one run over all the batches."""
        if not parts:
            raise ValueError("combine needs at least one result")
        measured = [p for p in parts if p.batches] or list(parts[:1])  # a rank may have had no batch
        first = measured[0]
        settings = lambda p: (p.unimodal_source, p.train_mode, p.gamma, p.head_shared, p.layers)  # noqa: E731
        if any(settings(p) != settings(first) for p in measured[1:]):
            raise ValueError("cannot combine conflict results of different models or settings")
        if len({p.sketch is None for p in measured}) > 1:
            raise ValueError("cannot combine exact and sketched per-sample cosines")
        method = merged_methods([p.per_sample_method for p in parts if p.samples])
        batches = sorted((b for p in parts for b in p.batches), key=lambda b: (b.first_index, b.position))
        samples = sorted((s for p in parts for s in p.samples), key=lambda s: s.index)
        engines = [p.engine for p in parts if p.engine is not None and p.samples]
        sketches = [p.sketch for p in parts if p.sketch is not None]
        return cls(first.unimodal_source, first.train_mode, method, first.gamma, first.head_shared, first.layers,
                   batches, samples, first.top_k, EngineReport.combine(engines) if engines else first.engine,
                   SketchReport.combine(sketches) if sketches else None)

"""Learning state of a modality (Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced
Multimodal Learning", ECCV 2024).

Pooled encoder features on a training subset D and a held-out set V, each scaled to [-1, 1];
k-means with k = the number of classes (fixed seed); cluster purity P_D, P_V; gap
``g_m = |P_D - P_V|`` (a large gap: an over-fitted, memorising modality); re-learning strength
``alpha_m = tanh(lambda * g_m)`` (lambda 3). Rows are sorted by sample index before clustering, so
the result does not depend on batch or shard order.

Two ways in: :func:`measure` over :class:`~avdiag.models.parts.AVParts` (the contribution measures),
and :func:`encoder_features` over a resolved model and its encoder prefixes (forward hooks; the
relearn rewrite, which has no ``AVParts``). Both end in :func:`cluster_purity`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from scipy.cluster.vq import kmeans2

from avdiag.locate.resolve import ResolvedModel, out_of_memory_as_error
from avdiag.measure.contribution.passes import MODALITIES, run
from avdiag.measure.contribution.table import (
    disjoint_index, feature_matrix, index_order, int_column, json_column,
)
from avdiag.measure.precision import f32, full_fp32
from avdiag.models.parts import AVParts
from avdiag.results import finite

RELEARN_LAMBDA = 3.0


@dataclass(frozen=True)
class LearningState:
    """The purities of one modality on the training and the held-out data."""

    modality: str
    purity_train: float
    purity_heldout: float
    n_train: int
    n_heldout: int

    @property
    def gap(self) -> float:
        return abs(self.purity_train - self.purity_heldout)

    def alpha(self, lam: float) -> float:
        return float(np.tanh(lam * self.gap))

    def to_dict(self, lam: float) -> dict:
        return {"purity_train": finite(self.purity_train), "purity_heldout": finite(self.purity_heldout),
                "gap": finite(self.gap), "alpha": finite(self.alpha(lam)), "n_train": self.n_train,
                "n_heldout": self.n_heldout}


def scale_features(x: np.ndarray) -> np.ndarray:
    """Scale each feature dimension to [-1, 1] (constant dimensions become 0)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, 2.0 * (x - lo) / span - 1.0, 0.0)


def cluster_purity(features: np.ndarray, labels: np.ndarray, k: int, seed: int = 0) -> float:
    """Purity of k-means clusters: the share of samples that carry their cluster's majority label."""
    _, assign = kmeans2(scale_features(features.astype(np.float64)), k, minit="++", seed=seed)
    majority = sum(np.bincount(labels[assign == c]).max() for c in np.unique(assign))
    return float(majority) / len(labels)


def encoder_features(resolved: ResolvedModel, prefixes: dict[str, str], batches: Iterable[dict],
                     device: torch.device, *, tf32: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled output of each modality's encoder (eval mode, forward hooks, full float32 unless
    ``tf32``), and the labels. The encoder is the model's ``audio_encoder`` / ``visual_encoder`` when
    it follows the adapter protocol (they give pooled features), else the module at the modality's
    prefix (feature maps, pooled here, frames folded into the batch or not)."""
    model = resolved.to(device).eval()
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in prefixes}
    labels = []
    handles = []
    batch = {"size": 1}
    for modality, module in _encoder_modules(model, resolved, prefixes).items():
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, m=modality: feats[m].append(_pool(out, batch["size"]))))
    try:
        with torch.inference_mode(), full_fp32(device, enabled=not tf32), out_of_memory_as_error():
            for raw in batches:
                inputs = {k: v.to(device, non_blocking=True) for k, v in raw.items() if isinstance(v, torch.Tensor)}
                batch["size"] = int(inputs["label"].shape[0])
                resolved(inputs)
                labels.append(raw["label"].cpu())
    finally:
        for h in handles:
            h.remove()
    return ({m: torch.cat(v).cpu().double().numpy() for m, v in feats.items()},
            torch.cat(labels).numpy().astype(np.int64))


def _encoder_modules(model: nn.Module, resolved: ResolvedModel, prefixes: dict[str, str]) -> dict[str, nn.Module]:
    adapter = {m: getattr(model, f"{m}_encoder", None) for m in prefixes}
    if all(isinstance(e, nn.Module) for e in adapter.values()):
        return adapter
    return {m: model.get_submodule(p[len(resolved.name_prefix):].rstrip(".")) for m, p in prefixes.items()}


def _pool(out: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B*T, C, ...) encoder maps of T frames folded into the batch, (B, C, ...) maps or (B, C) pooled
    features -> (B, C), averaged over frames and space."""
    pooled = f32(out).mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else f32(out)
    return pooled.reshape(batch_size, -1, pooled.shape[-1]).mean(dim=1)


# ---- over AVParts: the pooled features of a pass, and the result ---------------------------------


@dataclass(eq=False)
class PooledFeatures:
    """The pooled feature of each modality for every sample of a pass (float64), with index and label."""

    index: np.ndarray
    label: np.ndarray
    features: dict[str, np.ndarray]  # modality -> (n, d)

    @property
    def n(self) -> int:
        return int(len(self.index))

    def sorted(self) -> "PooledFeatures":
        order = index_order(self.index)
        return PooledFeatures(self.index[order], self.label[order], {m: f[order] for m, f in self.features.items()})

    def to_dict(self) -> dict:
        return {"index": json_column(self.index), "label": json_column(self.label),
                "dims": {m: int(f.shape[1]) for m, f in self.features.items()},
                **{m: json_column(f) for m, f in self.features.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "PooledFeatures":
        return cls(int_column(d["index"]), int_column(d["label"]),
                   {m: feature_matrix(d[m], int(dim)) for m, dim in d["dims"].items()})

    @classmethod
    def combine(cls, parts: Sequence["PooledFeatures"], what: str = "shards") -> "PooledFeatures":
        """The samples of disjoint shards together, in dataset-index order."""
        index = disjoint_index([p.index for p in parts], what)
        label = np.concatenate([p.label for p in parts])
        features = {m: np.concatenate([p.features[m] for p in parts]) for m in parts[0].features}
        return PooledFeatures(index, label, features).sorted()


class FeatureCollector:
    """The pooled features of every batch of a pass."""

    def __init__(self) -> None:
        self.columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("index", "label", *MODALITIES)}
        self.n_classes: int | None = None

    def add(self, parts: AVParts, batch: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
            index: torch.Tensor) -> None:
        self.columns["index"].append(index)
        self.columns["label"].append(batch["label"].long())
        for m in MODALITIES:
            self.columns[m].append(feats[m].double())
        if self.n_classes is None:
            self.n_classes = int(parts.fuse(feats["audio"][:1], feats["visual"][:1]).shape[-1])

    def result(self) -> PooledFeatures:
        host = {k: torch.cat(v).cpu().numpy() for k, v in self.columns.items()}
        return PooledFeatures(host["index"].astype(np.int64), host["label"].astype(np.int64),
                              {m: host[m] for m in MODALITIES})


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
            out = s.to_dict(self.lam)
        else:
            out = {"purity_train": finite(self.purity_train), "purity_heldout": finite(self.purity_heldout),
                   "gap": None, "alpha": None, "n_train": self.n_train, "n_heldout": self.n_heldout}
        out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, modality: str, d: dict, lam: float) -> "ModalityLearningState":
        """A purity written as null was not measured (``reason`` says why) and stays None."""
        def purity(key: str) -> float | None:
            return None if d[key] is None else float(d[key])

        return cls(modality, purity("purity_train"), int(d["n_train"]), purity("purity_heldout"),
                   int(d["n_heldout"]), lam, d.get("reason"))


def _purity(data: PooledFeatures | None, m: str, k: int, seed: int) -> tuple[float | None, int, str | None]:
    if data is None:
        return None, 0, "no held-out data given"
    data = data.sorted()
    if data.n < k:
        return None, data.n, f"{data.n} samples, fewer than k = {k} clusters"
    return cluster_purity(data.features[m], data.label, k, seed=seed), data.n, None


@dataclass(frozen=True, eq=False)
class LearningStateResult:
    """The learning state of each modality, and (when kept) the pooled features it came from."""

    lam: float
    k: int
    seed: int
    modalities: dict[str, ModalityLearningState]
    train: PooledFeatures | None = None
    heldout: PooledFeatures | None = None

    @classmethod
    def from_features(cls, train: PooledFeatures, heldout: PooledFeatures | None, k: int,
                      lam: float = RELEARN_LAMBDA, seed: int = 0) -> "LearningStateResult":
        states = {}
        for m in MODALITIES:
            p_train, n_train, why_train = _purity(train, m, k, seed)
            p_held, n_held, why_held = _purity(heldout, m, k, seed)
            reasons = [r for r in (why_train and f"train: {why_train}", why_held and f"held-out: {why_held}") if r]
            states[m] = ModalityLearningState(m, p_train, n_train, p_held, n_held, lam, "; ".join(reasons) or None)
        return cls(lam, k, seed, states, train, heldout)

    def to_dict(self, records: bool = True) -> dict:
        """The figures; with ``records`` also the pooled features (what ``combine`` needs)."""
        out = {"lambda": self.lam, "k": self.k, "seed": self.seed,
               **{m: s.to_dict() for m, s in self.modalities.items()}}
        if records:
            out["features"] = self.train.to_dict() if self.train is not None else None
            out["heldout"] = self.heldout.to_dict() if self.heldout is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LearningStateResult":
        """From ``to_dict()``: recomputed from the features when they are there, else the figures as written."""
        lam, k, seed = float(d["lambda"]), int(d["k"]), int(d["seed"])
        if d.get("features") is not None:
            heldout = PooledFeatures.from_dict(d["heldout"]) if d.get("heldout") is not None else None
            return cls.from_features(PooledFeatures.from_dict(d["features"]), heldout, k, lam, seed)
        return cls(lam, k, seed, {m: ModalityLearningState.from_dict(m, d[m], lam) for m in MODALITIES if m in d})

    @classmethod
    def combine(cls, results: Sequence["LearningStateResult"]) -> "LearningStateResult":
        """The learning state of disjoint shards together (k-means over the union of their features)."""
        if not results:
            raise ValueError("nothing to combine")
        first = results[0]
        if any(r.train is None for r in results):
            raise ValueError("a learning state written without its features cannot be combined")
        if any((r.lam, r.k, r.seed) != (first.lam, first.k, first.seed) for r in results):
            raise ValueError("cannot combine learning states of different lambda, k or seed")
        if len({r.heldout is None for r in results}) > 1:
            raise ValueError("shards disagree on whether held-out data was measured")
        train = PooledFeatures.combine([r.train for r in results])
        heldout = None if first.heldout is None else PooledFeatures.combine([r.heldout for r in results],
                                                                            "held-out shards")
        return cls.from_features(train, heldout, first.k, first.lam, first.seed)


def measure(parts: AVParts, batches: Iterable[dict], device: torch.device | str = "cpu", *,
            heldout_batches: Iterable[dict] | None = None, k: int | None = None, lam: float = RELEARN_LAMBDA,
            seed: int = 0, tf32: bool = False) -> LearningStateResult:
    """The learning state of each modality on ``batches`` against ``heldout_batches`` (eval mode);
    ``k`` defaults to the number of classes of the fused head."""
    train = FeatureCollector()
    run(parts, batches, device, [train], tf32=tf32)
    heldout = None
    if heldout_batches is not None:
        held = FeatureCollector()
        run(parts, heldout_batches, device, [held], empty="the held-out data has no batches", tf32=tf32)
        heldout = held.result()
    return LearningStateResult.from_features(train.result(), heldout, k or train.n_classes, lam, seed)

"""Learning state of a modality (Diagnosing & Re-learning, Wei, Li, Feng, Hu, ECCV 2024).

Pooled encoder features on a training subset D and a held-out set V, each scaled to [-1, 1],
k-means with k = number of classes (fixed seed), cluster purity P_D, P_V; gap g_m = |P_D - P_V|;
re-learning strength alpha_m = tanh(lambda * g_m).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from avdiag.locate.resolve import ResolvedModel


@dataclass(frozen=True)
class LearningState:
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
        return {"purity_train": self.purity_train, "purity_heldout": self.purity_heldout, "gap": self.gap,
                "alpha": self.alpha(lam), "n_train": self.n_train, "n_heldout": self.n_heldout}


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
                     device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled output of each modality's encoder (eval mode, forward hooks), and the labels."""
    model = resolved.module.to(device).eval()
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in prefixes}
    labels = []
    handles = []
    frames = {"t": 1}
    for modality, prefix in prefixes.items():
        module = model.get_submodule(prefix[len(resolved.name_prefix):].rstrip("."))
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, m=modality: feats[m].append(_pool(out, frames["t"] if m == "visual" else 1))))
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                frames["t"] = inputs["visual"].shape[2] if "visual" in inputs else 1
                resolved(inputs)
                labels.append(batch["label"].cpu())
    finally:
        for h in handles:
            h.remove()
    return ({m: torch.cat(v).cpu().double().numpy() for m, v in feats.items()},
            torch.cat(labels).numpy().astype(np.int64))


def _pool(out: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*T, C, h, w) encoder maps -> (B, C), averaged over frames and space."""
    pooled = out.float().mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out.float()
    return pooled.reshape(-1, frames, pooled.shape[-1]).mean(dim=1)

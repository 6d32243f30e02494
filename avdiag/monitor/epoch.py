"""The monitor's once-per-epoch metrics on small loaders, through the offline measures of
:mod:`avdiag.measure.contribution` (eval mode, no gradients; the model's train/eval flags restored).

* held-out: fused and uni-modal accuracy and the exact two-player Shapley values (pooled feature
  zeroed; Wei et al., CVPR 2024), mean per modality, both value functions;
* learning state (Wei, Li, Feng, Hu, ECCV 2024): k-means purity of each encoder's pooled features
  on a training subset against the held-out set, and their gap.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from avdiag.measure.contribution import contribution_partial, learning_state
from avdiag.models.parts import AVParts


def heldout_metrics(parts: AVParts, batches: Iterable[dict], device: torch.device, ogm_alpha: float) -> dict[str, Any]:
    result = contribution_partial(parts, batches, device, input_ablation=False, keep_features=False).result(ogm_alpha)
    return {"n_samples": result.n_samples, "fused_accuracy": result.fused_accuracy,
            "unimodal_accuracy": {m: c.unimodal_accuracy for m, c in result.modalities.items()},
            "shapley_accuracy": {m: c.shapley_mean_accuracy for m, c in result.modalities.items()},
            "shapley_probability": {m: c.shapley_mean_probability for m, c in result.modalities.items()},
            "rho": result.ogm.rho}


def learning_state_metrics(parts: AVParts, train_batches: Iterable[dict], heldout_batches: Iterable[dict],
                           device: torch.device, seed: int) -> dict[str, Any]:
    result = learning_state.measure(parts, train_batches, device, heldout_batches=heldout_batches, seed=seed)
    return {m: {"purity_train": s.purity_train, "purity_heldout": s.purity_heldout, "gap": s.gap,
                "alpha": s.alpha, "reason": s.reason} for m, s in result.modalities.items()}

"""The pieces of an audio-visual classifier that conflict and contribution analyses need:
per-modality encoders and pooled features, the fused head, and uni-modal logits.

Each family's ``parts`` (``avdiag/models/arch/``) builds them. Uni-modal logits come from trained
uni-modal heads when the checkpoint has them (MMPareto / D&R, CRMT), else from slicing the fused
linear classifier (concat: out_m = f_m @ W[:, block_m].T + b/2; sum: fc_x(a), fc_y(v)), else from
feature ablation (FiLM, gated: the other modality's pooled feature zeroed), and ``unimodal_source``
says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avdiag.models.av import audio_features, visual_features
from avdiag.models.registry import parts_of
from avdiag.models.resnet import ResNetEncoder

Features = dict[str, torch.Tensor]
Fuse = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Unimodal = Callable[[torch.Tensor, torch.Tensor], Features]


@dataclass
class AVParts:
    model: nn.Module
    encoders: dict[str, ResNetEncoder]  # modality -> encoder module (its parameters are "encoder m")
    head: nn.Module  # the fused classifier's module (shared parameters)
    fuse: Fuse  # (a, v) pooled features -> fused logits
    unimodal: Unimodal  # (a, v) -> {"audio": out_a, "visual": out_v}
    unimodal_source: str  # "heads" / "slice" / "ablation"
    feature_order: tuple[str, str]  # order of the modalities in the fused head's input

    def features(self, batch: dict[str, torch.Tensor]) -> Features:
        return {"audio": audio_features(self.encoders["audio"], batch["audio"]),
                "visual": visual_features(self.encoders["visual"], batch["visual"])}


def concat_slices(linear: nn.Linear, order: tuple[str, str]) -> Unimodal:
    """Uni-modal logits of a linear head over cat(features in ``order``): each modality's block of
    the weight, and half the bias."""
    def unimodal(a: torch.Tensor, v: torch.Tensor) -> Features:
        d = a.shape[1]
        feats = {"audio": a, "visual": v}
        out = {}
        for i, m in enumerate(order):
            w = linear.weight[:, i * d:(i + 1) * d]
            out[m] = feats[m] @ w.T + linear.bias / 2
        return out

    return unimodal


def ablation(fuse: Fuse) -> Unimodal:
    """Uni-modal logits of a non-linear fusion: the other modality's pooled feature zeroed."""
    def unimodal(a: torch.Tensor, v: torch.Tensor) -> Features:
        return {"audio": fuse(a, torch.zeros_like(v)), "visual": fuse(torch.zeros_like(a), v)}

    return unimodal


def av_parts(model: nn.Module) -> AVParts:
    """AVParts of a registered audio-visual classifier; TypeError for other models."""
    parts = parts_of(model)
    if parts is None:
        raise TypeError(f"{type(model).__name__} is not a built-in audio-visual classifier")
    return parts

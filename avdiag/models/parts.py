"""The pieces of an audio-visual classifier that conflict and contribution analyses need:
per-modality encoders and pooled features, the fused head, and uni-modal logits.

Uni-modal logits come from trained uni-modal heads when the checkpoint has them (MMPareto / D&R,
CRMT), else from slicing the fused linear classifier (concat: out_m = f_m @ W[:, block_m].T + b/2;
sum: fc_x(a), fc_y(v)), else from feature ablation (FiLM, gated: the other modality's pooled feature
zeroed), and ``unimodal_source`` says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avdiag.models.av import (
    BalanceMMClassifier,
    CRMTClassifier,
    JournalOPMClassifier,
    LegacyOGMClassifier,
    MMParetoClassifier,
    OGMGEClassifier,
    audio_features,
    visual_features,
)
from avdiag.models.resnet import ResNetEncoder

Features = dict[str, torch.Tensor]


@dataclass
class AVParts:
    model: nn.Module
    encoders: dict[str, ResNetEncoder]  # modality -> encoder module (its parameters are "encoder m")
    head: nn.Module  # the fused classifier's module (shared parameters)
    fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a, v) pooled features -> fused logits
    unimodal: Callable[[torch.Tensor, torch.Tensor], Features]  # (a, v) -> {"audio": out_a, "visual": out_v}
    unimodal_source: str  # "heads" / "slice" / "ablation"
    feature_order: tuple[str, str]  # order of the modalities in the fused head's input

    def features(self, batch: dict[str, torch.Tensor]) -> Features:
        return {"audio": audio_features(self.encoders["audio"], batch["audio"]),
                "visual": visual_features(self.encoders["visual"], batch["visual"])}


def _concat_slices(linear: nn.Linear, order: tuple[str, str]) -> Callable[[torch.Tensor, torch.Tensor], Features]:
    def unimodal(a: torch.Tensor, v: torch.Tensor) -> Features:
        d = a.shape[1]
        feats = {"audio": a, "visual": v}
        out = {}
        for i, m in enumerate(order):
            w = linear.weight[:, i * d:(i + 1) * d]
            out[m] = feats[m] @ w.T + linear.bias / 2
        return out

    return unimodal


def _ablation(fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    def unimodal(a: torch.Tensor, v: torch.Tensor) -> Features:
        return {"audio": fuse(a, torch.zeros_like(v)), "visual": fuse(torch.zeros_like(a), v)}

    return unimodal


def av_parts(model: nn.Module) -> AVParts:
    """AVParts of a built-in research classifier (see avdiag.models.av); TypeError for other models."""
    if isinstance(model, OGMGEClassifier):
        enc = {"audio": model.audio_net, "visual": model.visual_net}
        head = model.fusion_module
        fuse = head.forward
        if model.fusion == "concat":
            return AVParts(model, enc, head, fuse, _concat_slices(head.fc_out, ("audio", "visual")), "slice",
                           ("audio", "visual"))
        if model.fusion == "sum":
            return AVParts(model, enc, head, fuse, lambda a, v: {"audio": head.fc_x(a), "visual": head.fc_y(v)},
                           "slice", ("audio", "visual"))
        return AVParts(model, enc, head, fuse, _ablation(fuse), "ablation", ("audio", "visual"))
    if isinstance(model, LegacyOGMClassifier):
        enc = {"audio": model.parta, "visual": model.partv}
        fuse = lambda a, v: model.fc_(torch.cat((v, a), dim=1))  # noqa: E731
        return AVParts(model, enc, model.fc_, fuse, _concat_slices(model.fc_, ("visual", "audio")), "slice",
                       ("visual", "audio"))
    if isinstance(model, JournalOPMClassifier):
        enc = {"audio": model.encoder_1, "visual": model.encoder_2}
        head = model.fusion_model.fxy
        fuse = lambda a, v: head(torch.cat((a, v), dim=1))  # noqa: E731
        return AVParts(model, enc, head, fuse, _concat_slices(head, ("audio", "visual")), "slice", ("audio", "visual"))
    if isinstance(model, MMParetoClassifier):
        enc = {"audio": model.audio_net, "visual": model.visual_net}
        fuse = lambda a, v: model.head(torch.cat((a, v), dim=1))  # noqa: E731
        return AVParts(model, enc, model.head, fuse,
                       lambda a, v: {"audio": model.head_audio(a), "visual": model.head_video(v)}, "heads",
                       ("audio", "visual"))
    if isinstance(model, CRMTClassifier):
        enc = {"audio": model.audio_net, "visual": model.visual_net}
        orth = model.fusion_module.orth_layer
        fuse = lambda a, v: orth.fc(torch.cat((v, a), dim=1))  # noqa: E731
        return AVParts(model, enc, orth.fc, fuse, lambda a, v: {"audio": orth.a_1(a), "visual": orth.a_0(v)},
                       "heads", ("visual", "audio"))
    if isinstance(model, BalanceMMClassifier):
        enc = {"audio": model.modality_encoder["audio"], "visual": model.modality_encoder["visual"]}
        head = model.fusion_module
        return AVParts(model, enc, head, head.forward, _concat_slices(head.fc_out, ("audio", "visual")), "slice",
                       ("audio", "visual"))
    raise TypeError(f"{type(model).__name__} is not a built-in audio-visual classifier")

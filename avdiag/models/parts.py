"""The pieces of an audio-visual classifier that conflict and contribution analyses need:
per-modality encoders and pooled features, the fused head, and uni-modal logits.

Each family's ``parts`` (``avdiag/models/arch/``) builds them. Uni-modal logits come from trained
uni-modal heads when the checkpoint has them (MMPareto / D&R, CRMT), else from slicing the fused
linear classifier (concat: out_m = f_m @ W[:, block_m].T + b/2; sum: fc_x(a), fc_y(v)), else from
feature ablation (FiLM, gated: the other modality's pooled feature zeroed), and ``unimodal_source``
says which.

Any other model can take part through the adapter protocol (:func:`custom_parts`): it exposes

* ``audio_encoder`` and ``visual_encoder``: ``nn.Module`` attributes mapping the batch's ``audio``
  (B, F, T) and ``visual`` (B, 3, T, H, W) tensors to pooled features (B, D_audio) and (B, D_visual);
  their parameters are the two encoders whose gradients are compared;
* ``fuse(a, v)``: the fused logits (B, classes) from the two pooled features (every parameter
  outside the two encoders is the fused head's);
* optionally ``unimodal(a, v)``: ``{"audio": logits, "visual": logits}`` from trained uni-modal
  heads; without it, uni-modal logits come from feature ablation (the other feature zeroed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from avdiag.models.av import audio_features, visual_features
from avdiag.models.registry import parts_of
from avdiag.models.resnet import ResNetEncoder

Features = dict[str, torch.Tensor]
Fuse = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Unimodal = Callable[[torch.Tensor, torch.Tensor], Features]
FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (encoder, modality input) -> pooled features
MODALITIES = ("audio", "visual")
ADAPTER = ("audio_encoder", "visual_encoder", "fuse")


def _built_in_features() -> dict[str, FeatureFn]:
    return {"audio": audio_features, "visual": visual_features}


def _call_encoder(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder(x)


@dataclass
class AVParts:
    model: nn.Module
    encoders: dict[str, ResNetEncoder]  # modality -> encoder module (its parameters are "encoder m")
    head: nn.Module  # the fused classifier's module (shared parameters)
    fuse: Fuse  # (a, v) pooled features -> fused logits
    unimodal: Unimodal  # (a, v) -> {"audio": out_a, "visual": out_v}
    unimodal_source: str  # "heads" / "slice" / "ablation"
    feature_order: tuple[str, str]  # order of the modalities in the fused head's input
    feature_fns: dict[str, FeatureFn] = field(default_factory=_built_in_features)  # how each encoder is run
    # Whether every module of an encoder keeps each sample's rows together (frames folded sample-major),
    # as the per-layer products of the conflict engine need; unknown (False) for an adapter model.
    sample_major_rows: bool = True

    def feature(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) of one modality's input."""
        return self.feature_fns[modality](self.encoders[modality], x)

    def features(self, batch: dict[str, torch.Tensor]) -> Features:
        return {m: self.feature(m, batch[m]) for m in MODALITIES}


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


def custom_parts(model: nn.Module) -> AVParts | None:
    """AVParts of a model that follows the adapter protocol (see the module docstring), or None."""
    encoders = {m: getattr(model, f"{m}_encoder", None) for m in MODALITIES}
    if not all(isinstance(e, nn.Module) for e in encoders.values()) or not callable(getattr(model, "fuse", None)):
        return None
    own = getattr(model, "unimodal", None)
    return AVParts(model, encoders, model, model.fuse, own if callable(own) else ablation(model.fuse),
                   "heads" if callable(own) else "ablation", MODALITIES,
                   {m: _call_encoder for m in MODALITIES}, sample_major_rows=False)


def av_parts(model: nn.Module) -> AVParts:
    """AVParts of a built-in audio-visual classifier or of a model that follows the adapter protocol;
    TypeError (saying what is missing) for other models."""
    parts = parts_of(model) or custom_parts(model)
    if parts is None:
        missing = [a for a in ADAPTER if getattr(model, a, None) is None]
        raise TypeError(f"{type(model).__name__} is neither a built-in audio-visual classifier nor follows the "
                        f"adapter protocol (missing: {', '.join(missing) or 'callable fuse'}; a model needs "
                        "audio_encoder and visual_encoder modules giving pooled features, fuse(a, v) giving logits "
                        "and optionally unimodal(a, v))")
    return parts

"""MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
ICML 2024); Diagnosing & Re-learning (Wei et al., ECCV 2024) saves the same layout. Trained uni-modal
heads ``head_audio`` and ``head_video`` beside the fused ``head``."""

from __future__ import annotations

import torch
from torch import nn

from avdiag.models.av import TwoStreamFamily, audio_features, encoder_pair, visual_features
from avdiag.models.parts import AVParts
from avdiag.models.registry import LayoutEvidence, register


class MMParetoClassifier(nn.Module):
    """``audio_net``, ``visual_net``, ``head`` (2d->n, audio first), and the uni-modal heads
    ``head_audio``, ``head_video`` (d->n).
    ``forward(audio, visual)`` returns ``(logits, audio_logits, visual_logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.audio_net, self.visual_net = encoder_pair(width)
        d = self.audio_net.out_dim
        self.head = nn.Linear(2 * d, n_classes)
        self.head_audio = nn.Linear(d, n_classes)
        self.head_video = nn.Linear(d, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.audio_net, audio)
        v = visual_features(self.visual_net, visual)
        return self.head(torch.cat((a, v), dim=1)), self.head_audio(a), self.head_video(v)


@register
class MMPareto(TwoStreamFamily):
    name = "mmpareto"
    encoders = {"audio_net": "audio", "visual_net": "visual"}
    encoder = "audio_net."
    class_head = "head"
    model = MMParetoClassifier

    def claims(self, evidence: LayoutEvidence) -> bool:
        return evidence.has("head_audio.") or evidence.has("head_video.")

    def parts(self, model: nn.Module) -> AVParts | None:
        if not isinstance(model, MMParetoClassifier):
            return None
        return AVParts(model, {"audio": model.audio_net, "visual": model.visual_net}, model.head,
                       lambda a, v: model.head(torch.cat((a, v), dim=1)),
                       lambda a, v: {"audio": model.head_audio(a), "visual": model.head_video(v)}, "heads",
                       ("audio", "visual"))

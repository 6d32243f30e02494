"""CRMT (Yang et al., "Quantifying and Enhancing Multi-modal Robustness with Modality Preference",
ICLR 2024): the fused head ``fusion_module.orth_layer.fc`` reads ``cat(v, a)``, VISUAL first, beside
per-modality heads ``a_0`` (visual) and ``a_1`` (audio)."""

from __future__ import annotations

import torch
from torch import nn

from avdiag.models.av import TwoStreamFamily, audio_features, encoder_pair, visual_features
from avdiag.models.parts import AVParts
from avdiag.models.registry import LayoutEvidence, register


class CRMTClassifier(nn.Module):
    """``audio_net``, ``visual_net``, ``fusion_module.orth_layer.fc`` (2d->n) on ``cat(v, a)``,
    VISUAL first, and the per-modality heads ``fusion_module.orth_layer.a_0`` (visual, d->n) and
    ``a_1`` (audio, d->n). ``forward(audio, visual)`` returns ``(logits, audio_logits, visual_logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.audio_net, self.visual_net = encoder_pair(width)
        d = self.audio_net.out_dim
        orth = nn.Module()
        orth.fc = nn.Linear(2 * d, n_classes)
        orth.a_0 = nn.Linear(d, n_classes)
        orth.a_1 = nn.Linear(d, n_classes)
        self.fusion_module = nn.Module()
        self.fusion_module.orth_layer = orth

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.audio_net, audio)
        v = visual_features(self.visual_net, visual)
        orth = self.fusion_module.orth_layer
        return orth.fc(torch.cat((v, a), dim=1)), orth.a_1(a), orth.a_0(v)


@register
class CRMT(TwoStreamFamily):
    name = "crmt"
    encoders = {"audio_net": "audio", "visual_net": "visual"}
    encoder = "audio_net."
    class_head = "fusion_module.orth_layer.fc"
    model = CRMTClassifier

    def claims(self, evidence: LayoutEvidence) -> bool:
        return evidence.has("fusion_module.orth_layer.")

    def parts(self, model: nn.Module) -> AVParts | None:
        if not isinstance(model, CRMTClassifier):
            return None
        orth = model.fusion_module.orth_layer
        return AVParts(model, {"audio": model.audio_net, "visual": model.visual_net}, orth.fc,
                       lambda a, v: orth.fc(torch.cat((v, a), dim=1)),
                       lambda a, v: {"audio": orth.a_1(a), "visual": orth.a_0(v)}, "heads", ("visual", "audio"))

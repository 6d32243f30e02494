"""The earlier OGM-GE release layout (Peng et al., CVPR 2022): encoders ``parta`` (audio) and
``partv`` (visual), head ``fc_`` on ``cat(v, a)``, VISUAL first."""

from __future__ import annotations

import torch
from torch import nn

from avdiag.models.av import TwoStreamFamily, audio_features, encoder_pair, visual_features
from avdiag.models.parts import AVParts, concat_slices
from avdiag.models.registry import LayoutEvidence, register


class LegacyOGMClassifier(nn.Module):
    """Encoders ``parta`` (audio) and ``partv`` (visual), head ``fc_`` (2d->n) on ``cat(v, a)``,
    VISUAL first. ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.parta, self.partv = encoder_pair(width)
        self.fc_ = nn.Linear(2 * self.parta.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.parta, audio)
        v = visual_features(self.partv, visual)
        return a, v, self.fc_(torch.cat((v, a), dim=1))


@register
class LegacyOGM(TwoStreamFamily):
    name = "ogm-ge-legacy"
    encoders = {"parta": "audio", "partv": "visual"}
    encoder = "parta."
    class_head = "fc_"
    model = LegacyOGMClassifier

    def claims(self, evidence: LayoutEvidence) -> bool:
        return {"parta", "partv"} <= evidence.encoder_leaves

    def parts(self, model: nn.Module) -> AVParts | None:
        if not isinstance(model, LegacyOGMClassifier):
            return None
        order = ("visual", "audio")
        return AVParts(model, {"audio": model.parta, "visual": model.partv}, model.fc_,
                       lambda a, v: model.fc_(torch.cat((v, a), dim=1)), concat_slices(model.fc_, order), "slice",
                       order)

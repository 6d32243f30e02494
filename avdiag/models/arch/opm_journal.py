"""OPM / OGM journal version (Wei et al., "On-the-fly Modulation for Balanced Multimodal Learning",
TPAMI 2024): ``encoder_1`` (audio), ``encoder_2`` (visual), head ``fusion_model.fxy``, audio first."""

from __future__ import annotations

import torch
from torch import nn

from avdiag.models.av import TwoStreamFamily, audio_features, encoder_pair, visual_features
from avdiag.models.parts import AVParts, concat_slices
from avdiag.models.registry import LayoutEvidence, register


class JournalOPMClassifier(nn.Module):
    """``encoder_1`` (audio), ``encoder_2`` (visual), head ``fusion_model.fxy`` (2d->n), audio first.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.encoder_1, self.encoder_2 = encoder_pair(width)
        self.fusion_model = nn.Module()
        self.fusion_model.fxy = nn.Linear(2 * self.encoder_1.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.encoder_1, audio)
        v = visual_features(self.encoder_2, visual)
        return a, v, self.fusion_model.fxy(torch.cat((a, v), dim=1))


@register
class JournalOPM(TwoStreamFamily):
    name = "opm-journal"
    encoders = {"encoder_1": "audio", "encoder_2": "visual"}
    encoder = "encoder_1."
    class_head = "fusion_model.fxy"
    model = JournalOPMClassifier

    def claims(self, evidence: LayoutEvidence) -> bool:
        return "encoder_1" in evidence.encoder_leaves

    def parts(self, model: nn.Module) -> AVParts | None:
        if not isinstance(model, JournalOPMClassifier):
            return None
        head = model.fusion_model.fxy
        order = ("audio", "visual")
        return AVParts(model, {"audio": model.encoder_1, "visual": model.encoder_2}, head,
                       lambda a, v: head(torch.cat((a, v), dim=1)), concat_slices(head, order), "slice", order)

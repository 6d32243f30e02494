"""The BalanceMM toolkit layout: ``modality_encoder`` is an ``nn.ModuleDict`` keyed by modality, the
head ``fusion_module.fc_out`` concatenates audio first."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from avdiag.models.av import ConcatFusion, TwoStreamFamily, audio_features, encoder_pair, visual_features
from avdiag.models.parts import AVParts, concat_slices
from avdiag.models.registry import LayoutEvidence, register


class BalanceMMClassifier(nn.Module):
    """``modality_encoder`` is an ``nn.ModuleDict`` with ``audio`` and ``visual`` encoders; head
    ``fusion_module.fc_out`` (2d->n), audio first.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        audio, visual = encoder_pair(width)
        self.modality_encoder = nn.ModuleDict({"audio": audio, "visual": visual})
        self.fusion_module = ConcatFusion(audio.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.modality_encoder["audio"], audio)
        v = visual_features(self.modality_encoder["visual"], visual)
        return a, v, self.fusion_module(a, v)


@register
class BalanceMM(TwoStreamFamily):
    name = "balancemm"
    encoder = "modality_encoder.audio."
    class_head = "fusion_module.fc_out"
    model = BalanceMMClassifier

    def encoder_at(self, segments: Sequence[str], i: int) -> tuple[str, int] | None:
        """``modality_encoder.<modality>``: the key after the ModuleDict names the modality."""
        if segments[i] == "modality_encoder" and i + 1 < len(segments):
            return segments[i + 1], 2
        return None

    def claims(self, evidence: LayoutEvidence) -> bool:
        return any("modality_encoder." in p for p in evidence.encoders.values())

    def parts(self, model: nn.Module) -> AVParts | None:
        if not isinstance(model, BalanceMMClassifier):
            return None
        head = model.fusion_module
        order = ("audio", "visual")
        enc = {"audio": model.modality_encoder["audio"], "visual": model.modality_encoder["visual"]}
        return AVParts(model, enc, head, head.forward, concat_slices(head.fc_out, order), "slice", order)

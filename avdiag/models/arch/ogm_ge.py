"""OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022).

Keys: ``audio_net.*``, ``visual_net.*``, ``fusion_module.*``; the fusion module's linear layers
tell which of the four fusions a checkpoint has.
"""

from __future__ import annotations

import torch
from torch import nn

from avdiag.models.av import FUSIONS, TwoStreamFamily, audio_features, encoder_pair, visual_features
from avdiag.models.parts import AVParts, ablation, concat_slices
from avdiag.models.registry import ArchSpec, LayoutEvidence, register

# the linear layer of each fusion whose out_features is the class count
_CLASS_HEADS = {"concat": "fusion_module.fc_out", "sum": "fusion_module.fc_x", "film": "fusion_module.fc_out",
                "gated": "fusion_module.fc_out"}


class OGMGEClassifier(nn.Module):
    """``audio_net``, ``visual_net`` and ``fusion_module``, where the fusion is
    ``concat`` -> ``fc_out`` (2d->n, audio first); ``sum`` -> ``fc_x`` (audio),
    ``fc_y`` (visual), d->n each; ``film`` -> ``fc`` (d->2d, audio modulates
    visual) + ``fc_out`` (d->n); ``gated`` -> ``fc_x``, ``fc_y`` (d->d) +
    ``fc_out`` (d->n), the audio branch gating the visual one.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, fusion: str = "concat", width: int = 64):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        self.fusion = fusion
        self.audio_net, self.visual_net = encoder_pair(width)
        self.fusion_module = FUSIONS[fusion](self.audio_net.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.audio_net, audio)
        v = visual_features(self.visual_net, visual)
        return a, v, self.fusion_module(a, v)


@register
class OGMGE(TwoStreamFamily):
    name = "ogm-ge"
    priority = -1  # its signature, a fusion_module, is shared by CRMT and BalanceMM: tried after them
    encoders = {"audio_net": "audio", "visual_net": "visual"}
    encoder = "audio_net."
    model = OGMGEClassifier

    def claims(self, evidence: LayoutEvidence) -> bool:
        return evidence.has("fusion_module.")

    def fusion_of(self, head_names: list[str]) -> str | None:
        leaves = {h.rsplit(".", 1)[-1] for h in head_names if "fusion_module" in h.split(".")[:-1]}
        if {"fc_x", "fc_y", "fc_out"} <= leaves:
            return "gated"
        if {"fc", "fc_out"} <= leaves:
            return "film"
        if {"fc_x", "fc_y"} <= leaves:
            return "sum"
        return "concat" if "fc_out" in leaves else None

    def head_for(self, fusion: str | None) -> str | None:
        return _CLASS_HEADS.get(fusion or "")

    def build(self, spec: ArchSpec) -> nn.Module:
        return OGMGEClassifier(spec.n_classes, fusion=spec.fusion or "concat", width=spec.width)

    def parts(self, model: nn.Module) -> AVParts | None:
        if not isinstance(model, OGMGEClassifier):
            return None
        enc = {"audio": model.audio_net, "visual": model.visual_net}
        head = model.fusion_module
        order = ("audio", "visual")
        if model.fusion == "concat":
            return AVParts(model, enc, head, head.forward, concat_slices(head.fc_out, order), "slice", order)
        if model.fusion == "sum":
            return AVParts(model, enc, head, head.forward,
                           lambda a, v: {"audio": head.fc_x(a), "visual": head.fc_y(v)}, "slice", order)
        return AVParts(model, enc, head, head.forward, ablation(head.forward), "ablation", order)

"""A registry of built-in architectures and one factory: checkpoint tensors -> a ready model.

Each entry knows how to read its hyper-parameters (class count, width, depth, fusion) from the
tensor shapes of a checkpoint, so a checkpoint of a known layout needs no ``--model``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avdiag.load.store import TensorStore
from avdiag.models.av import (
    BalanceMMClassifier,
    CRMTClassifier,
    JournalOPMClassifier,
    LegacyOGMClassifier,
    MMParetoClassifier,
    OGMGEClassifier,
)
from avdiag.models.resnet import ResNetEncoder


@dataclass(frozen=True)
class ArchSpec:
    """What a checkpoint's shapes say about its architecture."""

    name: str  # registry entry
    n_classes: int | None
    width: int
    depth: int
    fusion: str | None = None
    in_channels: int = 3  # single-encoder models
    inputs: tuple[str, ...] = ("audio", "visual")  # forward() arguments, by modality
    visual_layout: str = "BCTHW"  # how the model wants clips: (B,3,T,H,W) or (B,T,3,H,W)

    def to_dict(self) -> dict:
        return dict(self.__dict__, inputs=list(self.inputs))


class ResNetClassifier(ResNetEncoder):
    """A plain ResNet with torchvision's `fc` head (keys conv1 ... layer4, fc)."""

    def __init__(self, depth: int, in_channels: int, width: int, n_classes: int):
        super().__init__(depth=depth, in_channels=in_channels, width=width)
        self.fc = nn.Linear(self.out_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(super().forward(x)))


Builder = Callable[[ArchSpec], nn.Module]
BUILDERS: dict[str, Builder] = {
    "ogm-ge": lambda s: OGMGEClassifier(s.n_classes, fusion=s.fusion or "concat", width=s.width),
    "ogm-ge-legacy": lambda s: LegacyOGMClassifier(s.n_classes, width=s.width),
    "opm-journal": lambda s: JournalOPMClassifier(s.n_classes, width=s.width),
    "mmpareto": lambda s: MMParetoClassifier(s.n_classes, width=s.width),
    "crmt": lambda s: CRMTClassifier(s.n_classes, width=s.width),
    "balancemm": lambda s: BalanceMMClassifier(s.n_classes, width=s.width),
    "resnet": lambda s: (ResNetClassifier(s.depth, s.in_channels, s.width, s.n_classes) if s.n_classes
                         else ResNetEncoder(depth=s.depth, in_channels=s.in_channels, width=s.width)),
}

# layout -> (an encoder prefix to read width/depth from, the head whose out_features is the class count)
_AV_SHAPES = {
    "ogm-ge": ("audio_net.", None),
    "ogm-ge-legacy": ("parta.", "fc_"),
    "opm-journal": ("encoder_1.", "fusion_model.fxy"),
    "mmpareto": ("audio_net.", "head"),
    "crmt": ("audio_net.", "fusion_module.orth_layer.fc"),
    "balancemm": ("modality_encoder.audio.", "fusion_module.fc_out"),
}
_OGM_HEADS = {"concat": "fusion_module.fc_out", "sum": "fusion_module.fc_x", "film": "fusion_module.fc_out",
              "gated": "fusion_module.fc_out"}


def build(spec: ArchSpec) -> nn.Module:
    return BUILDERS[spec.name](spec)


def spec_from_checkpoint(store: TensorStore, layout_name: str, fusion: str | None) -> ArchSpec | None:
    """The built-in architecture these tensors fit, or None when no entry claims them."""
    if layout_name in _AV_SHAPES:
        encoder, head = _AV_SHAPES[layout_name]
        head = _OGM_HEADS.get(fusion or "", None) if layout_name == "ogm-ge" else head
        shape = _encoder_shape(store, encoder)
        n_classes = _out_features(store, head) if head else None
        if shape is None or n_classes is None:
            return None
        width, depth, _ = shape
        return ArchSpec(layout_name, n_classes, width, depth, fusion=fusion)
    shape = _encoder_shape(store, "")
    if shape is None:
        return None
    width, depth, in_channels = shape
    return ArchSpec("resnet", _out_features(store, "fc"), width, depth, in_channels=in_channels,
                    inputs=("image",))


def _encoder_shape(store: TensorStore, prefix: str) -> tuple[int, int, int] | None:
    """(width, depth, in_channels) of a torchvision-layout ResNet of BasicBlocks under ``prefix``."""
    stem = prefix + "conv1.weight"
    if stem not in store or len(store.info(stem).shape) != 4:
        return None
    width, in_channels = store.info(stem).shape[:2]
    blocks = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{layer}\.(\d+)\.conv1\.weight$")
        blocks.append(len({m.group(1) for n in store.names() if (m := pattern.match(n))}))
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}.get(tuple(blocks))
    if depth is None or any(n.startswith(prefix + "layer1.0.conv3") for n in store.names()):
        return None  # not a BasicBlock ResNet-18/34
    return width, depth, in_channels


def _out_features(store: TensorStore, head: str) -> int | None:
    key = head + ".weight"
    if key not in store or len(store.info(key).shape) != 2:
        return None
    return store.info(key).shape[0]

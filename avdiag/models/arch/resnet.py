"""Plain ResNet-18/34 (torchvision BasicBlock layout): a single-modality classifier with its ``fc``
head, or a bare trunk. It builds any checkpoint whose layout no audio-visual family claims, and its
BatchNorm facts hold for every ResNet encoder, the research classifiers' included."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from avdiag.models.registry import Architecture, ArchFact, ArchSpec, NameIndex, out_features, register
from avdiag.models.resnet import ResNetEncoder, shape_from_tensors

if TYPE_CHECKING:
    from avdiag.load.store import TensorStore

_BLOCK_BN = re.compile(r"(?:^|\.)layer\d+\.\d+\.(bn\d|downsample\.1)$")


class ResNetClassifier(ResNetEncoder):
    """A plain ResNet with torchvision's `fc` head (keys conv1 ... layer4, fc)."""

    def __init__(self, depth: int, in_channels: int, width: int, n_classes: int):
        super().__init__(depth=depth, in_channels=in_channels, width=width)
        self.fc = nn.Linear(self.out_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(super().forward(x)))


@register
class ResNet(Architecture):
    name = "resnet"
    fallback = True

    def spec(self, store: TensorStore, fusion: str | None) -> ArchSpec | None:
        shape = shape_from_tensors(store, "")
        if shape is None:
            return None
        width, depth, in_channels = shape
        return ArchSpec(self.name, out_features(store, "fc"), width, depth, in_channels=in_channels,
                        inputs=("image",))

    def build(self, spec: ArchSpec) -> nn.Module:
        if spec.n_classes:
            return ResNetClassifier(spec.depth, spec.in_channels, spec.width, spec.n_classes)
        return ResNetEncoder(depth=spec.depth, in_channels=spec.in_channels, width=spec.width)

    def bn_fact(self, name: str, idx: NameIndex) -> ArchFact | None:
        """Block bn1/bn2 feed ReLU, the last BN of a block feeds the add; the stem bn1 feeds ReLU."""
        block = _BLOCK_BN.search(name)
        if block:
            base = name[: block.start(1)]
            if block.group(1) == "downsample.1":
                return ArchFact(self.name, "no", "residual-add", idx.module_or_none(base + "downsample.0"))
            last = "bn3" if idx.has_module(base + "bn3") else "bn2"
            conv = idx.module_or_none(base + "conv" + block.group(1)[2:])
            if block.group(1) == last:
                return ArchFact(self.name, "no", "residual-add", conv)
            return ArchFact(self.name, "yes", "relu", conv)
        parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
        if name.split(".")[-1] == "bn1" and idx.has_prefix(parent + "layer1."):
            return ArchFact(self.name, "yes", "relu", idx.module_or_none(parent + "conv1"))
        return None

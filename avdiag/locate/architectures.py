"""Architecture knowledge: for BN layers of known layouts, what feeds them and what they feed.

One rule per architecture family, tried in order (registry style). A rule looks only at tensor
names, and answers for a BN module name or returns None when the name is not of its family.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchFact:
    architecture: str
    feeds_activation: str  # "yes" / "no"
    activation: str  # "relu", "relu6", "silu", or what the BN feeds instead ("residual-add", "linear")
    conv: str | None  # module name of the feeding conv
    eps: float | None = None  # the architecture's BatchNorm eps, when it is not torch's 1e-5


class NameIndex:
    """Fast look-ups over a checkpoint's tensor names."""

    def __init__(self, names: list[str]):
        self.names = set(names)
        self.modules = {n.rsplit(".", 1)[0] for n in names if "." in n}

    def has_module(self, module: str) -> bool:
        return module in self.modules

    def has_prefix(self, prefix: str) -> bool:
        return any(m.startswith(prefix) for m in self.modules)

    def any_segment(self, segment: str) -> bool:
        return any(segment in m.split(".") for m in self.modules)


Rule = Callable[[str, NameIndex], ArchFact | None]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] + "." if "." in name else ""


def _conv_if(idx: NameIndex, module: str) -> str | None:
    return module if idx.has_module(module) else None


@rule
def resnet(name: str, idx: NameIndex) -> ArchFact | None:
    """ResNet (torchvision layout): block bn1/bn2 feed ReLU, the last BN of a block feeds the add."""
    block = re.search(r"(?:^|\.)layer\d+\.\d+\.(bn\d|downsample\.1)$", name)
    if block:
        base = name[: block.start(1)]
        if block.group(1) == "downsample.1":
            return ArchFact("resnet", "no", "residual-add", _conv_if(idx, base + "downsample.0"))
        last = "bn3" if idx.has_module(base + "bn3") else "bn2"
        conv = _conv_if(idx, base + "conv" + block.group(1)[2:])
        if block.group(1) == last:
            return ArchFact("resnet", "no", "residual-add", conv)
        return ArchFact("resnet", "yes", "relu", conv)
    if name.endswith("bn1") and name.split(".")[-1] == "bn1" and idx.has_prefix(_parent(name) + "layer1."):
        return ArchFact("resnet", "yes", "relu", _conv_if(idx, _parent(name) + "conv1"))
    return None


@rule
def efficientnet(name: str, idx: NameIndex) -> ArchFact | None:
    """EfficientNet (lukemelas layout, incl. Lite): _bn2 of a block is the linear projection.

    Lite variants drop squeeze-excitation and use ReLU6; the originals use swish (SiLU). Both use
    BatchNorm eps 1e-3.
    """
    m = re.search(r"(?:^|\.)(_blocks\.\d+\.)?(_bn[0-2])$", name)
    if not m or not idx.any_segment("_conv_stem"):
        return None
    act = "silu" if idx.any_segment("_se_reduce") else "relu6"
    base, bn = name[: m.start(2)], m.group(2)
    if m.group(1):
        conv = {"_bn0": "_expand_conv", "_bn1": "_depthwise_conv", "_bn2": "_project_conv"}[bn]
        if bn == "_bn2":
            return ArchFact("efficientnet", "no", "linear", _conv_if(idx, base + conv), 1e-3)
        return ArchFact("efficientnet", "yes", act, _conv_if(idx, base + conv), 1e-3)
    conv = {"_bn0": "_conv_stem", "_bn1": "_conv_head"}.get(bn)
    if conv is None:
        return None
    return ArchFact("efficientnet", "yes", act, _conv_if(idx, base + conv), 1e-3)


@rule
def mobilenet_v2(name: str, idx: NameIndex) -> ArchFact | None:
    """MobileNetV2 (torchvision layout): Conv-BN-ReLU6 units, except the block's last (linear) BN."""
    if "features." not in name or not idx.has_prefix(name[: name.index("features.")] + "features.1.conv."):
        return None
    unit = re.search(r"(?:^|\.)features\.\d+\.(?:conv\.\d+\.)?1$", name)
    if unit:
        return ArchFact("mobilenet_v2", "yes", "relu6", _conv_if(idx, name[:-1] + "0"))
    last = re.search(r"(?:^|\.)features\.\d+\.conv\.(\d+)$", name)
    if last:
        conv = name[: last.start(1)] + str(int(last.group(1)) - 1)
        return ArchFact("mobilenet_v2", "no", "linear", _conv_if(idx, conv))
    return None


@rule
def vgg_bn(name: str, idx: NameIndex) -> ArchFact | None:
    """VGG with BatchNorm (torchvision layout): features.N is a BN after the conv features.N-1."""
    m = re.search(r"(?:^|\.)features\.(\d+)$", name)
    if not m or not idx.has_prefix(name[: m.start(1)].replace("features.", "classifier.")):
        return None
    conv = name[: m.start(1)] + str(int(m.group(1)) - 1)
    if not idx.has_module(conv):
        return None
    return ArchFact("vgg", "yes", "relu", conv)


@rule
def crepe(name: str, idx: NameIndex) -> ArchFact | None:
    """CREPE pitch CNN (torchcrepe): conv -> ReLU -> BN, so the BN feeds max-pooling, not a ReLU.

    Its BatchNorm eps is Keras' 1e-3 as stored in float32 (0.0010000000474974513)."""
    m = re.search(r"(?:^|\.)(conv\d+)_BN$", name)
    if not m:
        return None
    conv = _conv_if(idx, name[: m.start(1)] + m.group(1))
    return ArchFact("crepe", "no", "maxpool (ReLU precedes the BN)", conv, 0.0010000000474974513)


def architecture_fact(name: str, idx: NameIndex) -> ArchFact | None:
    for fn in RULES:
        fact = fn(name, idx)
        if fact is not None:
            return fact
    return None

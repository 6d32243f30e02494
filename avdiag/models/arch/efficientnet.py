"""EfficientNet (lukemelas layout, incl. Lite): BatchNorm facts only."""

from __future__ import annotations

import re

from avdiag.models.registry import Architecture, ArchFact, NameIndex, register

_BN = re.compile(r"(?:^|\.)(_blocks\.\d+\.)?(_bn[0-2])$")
_BLOCK_CONVS = {"_bn0": "_expand_conv", "_bn1": "_depthwise_conv", "_bn2": "_project_conv"}
_STEM_HEAD_CONVS = {"_bn0": "_conv_stem", "_bn1": "_conv_head"}
EPS = 1e-3


@register
class EfficientNet(Architecture):
    """A block's _bn2 is the linear projection; every other BN feeds the activation. Lite variants
    drop squeeze-excitation and use ReLU6; the originals use swish (SiLU). Both use BatchNorm eps 1e-3.
    """

    name = "efficientnet"

    def bn_fact(self, name: str, idx: NameIndex) -> ArchFact | None:
        m = _BN.search(name)
        if not m or not idx.any_segment("_conv_stem"):
            return None
        act = "silu" if idx.any_segment("_se_reduce") else "relu6"
        base, bn = name[: m.start(2)], m.group(2)
        if m.group(1):
            conv = idx.module_or_none(base + _BLOCK_CONVS[bn])
            if bn == "_bn2":
                return ArchFact(self.name, "no", "linear", conv, EPS)
            return ArchFact(self.name, "yes", act, conv, EPS)
        conv = _STEM_HEAD_CONVS.get(bn)
        if conv is None:
            return None
        return ArchFact(self.name, "yes", act, idx.module_or_none(base + conv), EPS)

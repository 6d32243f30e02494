"""VGG with BatchNorm (torchvision layout): BatchNorm facts only."""

from __future__ import annotations

import re

from avdiag.models.registry import Architecture, ArchFact, NameIndex, register

_BN = re.compile(r"(?:^|\.)features\.(\d+)$")


@register
class VGG(Architecture):
    """features.N is a BN after the conv features.N-1, feeding a ReLU."""

    name = "vgg"

    def bn_fact(self, name: str, idx: NameIndex) -> ArchFact | None:
        m = _BN.search(name)
        if not m or not idx.has_prefix(name[: m.start(1)].replace("features.", "classifier.")):
            return None
        conv = name[: m.start(1)] + str(int(m.group(1)) - 1)
        if not idx.has_module(conv):
            return None
        return ArchFact(self.name, "yes", "relu", conv)

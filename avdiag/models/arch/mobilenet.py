"""MobileNetV2 (torchvision layout): BatchNorm facts only."""

from __future__ import annotations

import re

from avdiag.models.registry import Architecture, ArchFact, NameIndex, register

_UNIT_BN = re.compile(r"(?:^|\.)features\.\d+\.(?:conv\.\d+\.)?1$")
_LAST_BN = re.compile(r"(?:^|\.)features\.\d+\.conv\.(\d+)$")


@register
class MobileNetV2(Architecture):
    """Conv-BN-ReLU6 units, except the block's last BN, a linear projection."""

    name = "mobilenet_v2"

    def bn_fact(self, name: str, idx: NameIndex) -> ArchFact | None:
        if "features." not in name or not idx.has_prefix(name[: name.index("features.")] + "features.1.conv."):
            return None
        if _UNIT_BN.search(name):
            return ArchFact(self.name, "yes", "relu6", idx.module_or_none(name[:-1] + "0"))
        last = _LAST_BN.search(name)
        if last:
            conv = name[: last.start(1)] + str(int(last.group(1)) - 1)
            return ArchFact(self.name, "no", "linear", idx.module_or_none(conv))
        return None

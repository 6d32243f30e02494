"""CREPE pitch CNN (torchcrepe): BatchNorm facts only."""

from __future__ import annotations

import re

from avdiag.models.registry import Architecture, ArchFact, NameIndex, register

_BN = re.compile(r"(?:^|\.)(conv\d+)_BN$")
EPS = 0.0010000000474974513  # Keras' 1e-3 as stored in float32


@register
class Crepe(Architecture):
    """conv -> ReLU -> BN, so the BN feeds max-pooling, not a ReLU."""

    name = "crepe"

    def bn_fact(self, name: str, idx: NameIndex) -> ArchFact | None:
        m = _BN.search(name)
        if not m:
            return None
        conv = idx.module_or_none(name[: m.start(1)] + m.group(1))
        return ArchFact(self.name, "no", "maxpool (ReLU precedes the BN)", conv, EPS)

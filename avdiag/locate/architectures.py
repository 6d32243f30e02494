"""Architecture knowledge: for BN layers of known families, what feeds them and what they feed.

The facts come from the families of the architecture registry (``avdiag/models/arch/``, one module
per family, each answering from tensor names alone), tried in registry order.
"""

from __future__ import annotations

from avdiag.models.registry import ArchFact, NameIndex, bn_fact

__all__ = ["ArchFact", "NameIndex", "architecture_fact"]


def architecture_fact(name: str, idx: NameIndex) -> ArchFact | None:
    """What the first family that knows BN module ``name`` says about it, or None."""
    return bn_fact(name, idx)

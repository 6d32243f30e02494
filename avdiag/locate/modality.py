"""Group layers by modality and identify the research layout and its fusion heads.

The encoder names, layout signatures and fusions of the research codebases come from the
architecture registry (``avdiag/models/arch/``); modality words in names cover the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from avdiag.errors import UsageError
from avdiag.load.store import TensorStore
from avdiag.models import registry

MODALITY_WORDS = {
    "audio": {"audio", "aud", "sound", "speech", "spec", "spectrogram", "wav", "acoustic"},
    "visual": {"visual", "video", "vision", "image", "img", "rgb", "frame", "frames", "vis", "face"},
    "text": {"text", "txt", "language", "lang"},
}
SINGLE = "model"
OTHER = "other"


@dataclass
class Head:
    name: str
    in_features: int
    out_features: int

    def to_dict(self) -> dict:
        return {"name": self.name, "in_features": self.in_features, "out_features": self.out_features}


@dataclass
class Layout:
    name: str  # a registered family's name (ogm-ge, mmpareto, ...), generic, single or user
    modalities: dict[str, str]  # modality -> name prefix of its encoder
    source: str  # "auto" / "user"
    heads: list[Head] = field(default_factory=list)
    fusion: str | None = None  # concat / sum / film / gated where the layout tells

    def modality_of(self, name: str) -> str:
        best, best_len = None, -1
        for modality, prefix in self.modalities.items():
            if name.startswith(prefix) and len(prefix) > best_len:
                best, best_len = modality, len(prefix)
        if best is not None:
            return best
        return SINGLE if not self.modalities else OTHER

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "modalities": dict(self.modalities),
                "fusion": self.fusion, "heads": [h.to_dict() for h in self.heads]}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['audio=audio_net', ...] -> {'audio': 'audio_net.'}."""
    out = {}
    for item in items:
        name, sep, prefix = item.partition("=")
        if not sep or not name.strip() or not prefix.strip():
            raise UsageError(f"--modality wants NAME=PREFIX (e.g. audio=audio_net), got {item!r}")
        prefix = prefix.strip()
        out[name.strip()] = prefix if prefix.endswith(".") else prefix + "."
    return out


def detect_layout(store: TensorStore, overrides: dict[str, str] | None = None) -> Layout:
    names = store.names()
    if overrides:
        for modality, prefix in overrides.items():
            if not any(n.startswith(prefix) for n in names):
                raise UsageError(f"--modality {modality}={prefix.rstrip('.')}: no tensor name starts with {prefix!r}")
        layout = Layout("user", dict(overrides), "user")
    else:
        layout = _auto_layout(names)
    layout.heads = _heads(store, layout)
    layout.fusion = _fusion_kind(layout)
    return layout


# Detectors of layouts that one name prefix per modality cannot express (the transformer families of
# avdiag.locate.transformer_layouts append theirs): tensor names -> a Layout, or None. Tried first.
LAYOUT_DETECTORS: list[Callable[[list[str]], Layout | None]] = []


def _auto_layout(names: list[str]) -> Layout:
    for detect in LAYOUT_DETECTORS:
        layout = detect(names)
        if layout is not None:
            return layout
    found: dict[str, str] = {}
    for n in names:
        hit = _known_encoder(n) or _modality_word(n)
        if hit and hit[0] not in found:
            found[hit[0]] = hit[1]
    if len(found) < 2:
        return Layout("single", {}, "auto")
    return Layout(_layout_name(names, found), found, "auto")


def _known_encoder(name: str) -> tuple[str, str] | None:
    """A registered family's encoder in the module path of tensor ``name``, matched at any depth so
    that Lightning's `model.` or other outer prefixes do not hide it: (modality, its name prefix)."""
    module = name.split(".")[:-1]
    for i in range(len(module)):
        hit = registry.encoder_at(module, i)
        if hit is not None:
            modality, span = hit
            return modality, ".".join(module[: i + span]) + "."
    return None


def _modality_word(name: str) -> tuple[str, str] | None:
    segs = name.split(".")
    for i, seg in enumerate(segs[:-1]):
        tokens = set(re.split(r"[_\-]", seg.lower()))
        for modality, words in MODALITY_WORDS.items():
            if tokens & words:
                return modality, ".".join(segs[: i + 1]) + "."
    return None


def _layout_name(names: list[str], found: dict[str, str]) -> str:
    return registry.layout_name(registry.LayoutEvidence(names, found)) or "generic"


def _heads(store: TensorStore, layout: Layout) -> list[Head]:
    """Linear layers outside every encoder: the classifier / fusion heads."""
    heads = []
    for n in store.names():
        if not layout.modalities or not n.endswith(".weight") or layout.modality_of(n) != OTHER:
            continue
        info = store.info(n)
        if len(info.shape) == 2:
            heads.append(Head(n[: -len(".weight")], info.shape[1], info.shape[0]))
    return heads


def _fusion_kind(layout: Layout) -> str | None:
    return registry.fusion_of(layout.name, [h.name for h in layout.heads])

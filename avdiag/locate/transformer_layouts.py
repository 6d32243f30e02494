"""Layouts of the transformer audio-visual families, where one prefix per modality cannot say which
modality a tensor belongs to (key names from the public model code):

- CAV-MAE (Gong et al., ICLR 2023): ``patch_embed_a/_v``, ``pos_embed_a/_v``, ``modality_a/_v``,
  ``blocks_a.N`` / ``blocks_v.N``, the shared ``blocks_u.N`` (whose ``norm1_a/norm2_a`` and
  ``norm1_v/norm2_v`` see one modality's tokens only), ``norm_a``, ``norm_v``, the joint ``norm``,
  decoder parts ``decoder_*_a/_v`` and ``decoder_blocks``; head ``mlp_head``.
- MAViL-style ports: ``blocks_a`` / ``blocks_v``, the fusion ``blocks_av``, heads ``head_a``,
  ``head_v``, ``head_av``.
- ImageBind: ``modality_{preprocessors,trunks,heads,postprocessors}.<m>`` for m in vision, audio,
  text, depth, thermal, imu.
- AV-HuBERT (fairseq): ``feature_extractor_audio.*``, ``feature_extractor_video.resnet.*``
  (BatchNorm + PReLU), the shared ``encoder.layers.N``.
- AudioCLIP: ``audio.*`` (ESResNeXt), ``visual.*`` (CLIP ModifiedResNet), the text transformer
  ``transformer.*`` with ``token_embedding``, ``positional_embedding``, ``ln_final``,
  ``text_projection``.

Blocks that both modalities' tokens pass through are the modality ``shared``; heads and everything
else outside the encoders are ``other``. Names may carry an outer prefix (``module.``, ``model.``,
``w2v_encoder.w2v_model.``): every rule matches at a segment boundary.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from avdiag.locate.modality import LAYOUT_DETECTORS, OTHER, Layout

SHARED = "shared"
_B = r"(?:^|\.)"  # a segment boundary
_E = r"(?:\.|$)"  # the segment ends


@dataclass
class PatternLayout(Layout):
    """A layout whose modalities are told by ordered name patterns (the first that matches decides)."""

    rules: list[tuple[str, str]] = field(default_factory=list)  # (regex, modality)

    def __post_init__(self) -> None:
        self._compiled = [(re.compile(pattern), modality) for pattern, modality in self.rules]

    def modality_of(self, name: str) -> str:
        return self.match(name)[0]

    def match(self, name: str) -> tuple[str, str]:
        """(modality, the name up to the end of the matching pattern) of tensor ``name``."""
        for pattern, modality in self._compiled:
            hit = pattern.search(name)
            if hit:
                return modality, name[:hit.end()]
        return OTHER, ""


@dataclass(frozen=True)
class Family:
    name: str
    signature: Callable[[Sequence[str]], bool]
    rules: list[tuple[str, str]]


def _has(names: Sequence[str], pattern: str) -> bool:
    compiled = re.compile(pattern)
    return any(compiled.search(n) for n in names)


def _suffix_rules(shared: str) -> list[tuple[str, str]]:
    """CAV-MAE and MAViL name modality parts by a segment suffix: ``_a`` audio, ``_v`` visual, and
    ``shared`` (``u`` or ``av``) for the joint blocks; per-modality norms inside a joint block first."""
    return [
        (_B + rf"blocks_{shared}\.\d+\.norm\d_a{_E}", "audio"),
        (_B + rf"blocks_{shared}\.\d+\.norm\d_v{_E}", "visual"),
        (_B + rf"head_(?:a|v|av){_E}", OTHER),
        (_B + rf"\w+_{shared}{_E}", SHARED),
        (_B + rf"\w+_a{_E}", "audio"),
        (_B + rf"\w+_v{_E}", "visual"),
    ]


_IMAGEBIND_MODALITIES = {"vision": "visual", "audio": "audio", "text": "text", "depth": "depth",
                         "thermal": "thermal", "imu": "imu"}
_IMAGEBIND_PARTS = r"modality_(?:preprocessors|trunks|heads|postprocessors)"

FAMILIES = [
    Family("av-hubert",
           lambda names: (_has(names, _B + r"feature_extractor_video\.")
                          and _has(names, _B + r"feature_extractor_audio\.")),
           [(_B + r"feature_extractor_audio\.", "audio"), (_B + r"feature_extractor_video\.", "visual"),
            (_B + r"encoder\.layers\.", SHARED), (_B + r"encoder\.layer_norm\.", SHARED),
            (_B + r"encoder\.pos_conv\.", SHARED)]),
    Family("imagebind", lambda names: _has(names, _B + _IMAGEBIND_PARTS + r"\.(?:vision|audio)\."),
           [(_B + _IMAGEBIND_PARTS + rf"\.{m}\.", modality) for m, modality in _IMAGEBIND_MODALITIES.items()]),
    Family("mavil", lambda names: _has(names, _B + r"blocks_av\.") and _has(names, _B + r"blocks_[av]\."),
           _suffix_rules("av") + [(_B + r"norm\.", SHARED)]),
    Family("cav-mae", lambda names: _has(names, _B + r"patch_embed_a\.") and _has(names, _B + r"patch_embed_v\."),
           _suffix_rules("u") + [(_B + r"norm\.", SHARED), (_B + r"decoder_(?:blocks|norm|embed)\.", SHARED)]),
    Family("audioclip",
           lambda names: (_has(names, r"(?:^|\.)audio\.") and _has(names, r"(?:^|\.)visual\.")
                          and _has(names, r"(?:^|\.)transformer\.resblocks\.")),
           [(_B + r"audio\.", "audio"), (_B + r"visual\.", "visual"),
            (_B + r"(?:transformer|token_embedding|ln_final)\.", "text"),
            (_B + r"(?:positional_embedding|text_projection)$", "text")]),
]


def detect_transformer_layout(names: list[str]) -> PatternLayout | None:
    """The layout of the first family whose signature the names carry, or None."""
    for family in FAMILIES:
        if family.signature(names):
            return _layout(family, names)
    return None


def _layout(family: Family, names: list[str]) -> PatternLayout:
    layout = PatternLayout(family.name, {}, "auto", rules=family.rules)
    for n in names:  # the modalities in order of appearance, each with the first module prefix its rules matched
        modality, prefix = layout.match(n)
        if modality != OTHER and prefix.endswith(".") and modality not in layout.modalities:
            layout.modalities[modality] = prefix.lstrip(".")
    return layout


LAYOUT_DETECTORS.append(detect_transformer_layout)

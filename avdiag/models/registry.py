"""The architecture registry and its one factory: checkpoint tensors -> layout, spec, model, parts.

A family is one class, usually in its own file under ``avdiag/models/arch/``, registered with
``@register``. It overrides only what it knows; every default answers "not mine":

- ``encoders`` / ``encoder_at``: the module names of its encoders and their modality;
- ``claims``: whether a checkpoint's names are this family's layout (the layout takes its name);
- ``fusion_of``: the fusion its heads tell (concat / sum / film / gated);
- ``spec``: its hyper-parameters read from tensor shapes, so a checkpoint needs no ``--model``;
- ``build``: the ``nn.Module`` of a spec; ``parts``: that module's encoders, fused head and
  uni-modal logits (:class:`avdiag.models.parts.AVParts`) when it is an audio-visual classifier;
- ``bn_fact``: what a BatchNorm layer of the family feeds, from tensor names alone.

Families are tried in ``priority`` order (higher first), then in registration order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from avdiag.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

    from avdiag.load.store import TensorStore
    from avdiag.models.parts import AVParts


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


@dataclass(frozen=True)
class ArchFact:
    """What architecture knowledge says about one BatchNorm layer."""

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

    def module_or_none(self, module: str) -> str | None:
        return module if module in self.modules else None


@dataclass(frozen=True)
class LayoutEvidence:
    """What layout detection has found in a checkpoint's tensor names."""

    names: Sequence[str]
    encoders: dict[str, str]  # modality -> name prefix of its encoder ("audio_net.")

    def has(self, part: str) -> bool:
        """``part`` occurs anywhere in a tensor name."""
        return any(part in n for n in self.names)

    @property
    def encoder_leaves(self) -> set[str]:
        """The last segment of every encoder prefix ("parta" for "module.parta.")."""
        return {p.rstrip(".").rsplit(".", 1)[-1] for p in self.encoders.values()}


class Architecture:
    """One family of architectures. Subclass, set ``name``, override what the family knows."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # higher is tried first: give a generic signature a low priority
    encoders: ClassVar[dict[str, str]] = {}  # encoder module name -> modality ({"audio_net": "audio"})
    fusion: ClassVar[str | None] = None  # the fusion every checkpoint of the family has, if one
    fallback: ClassVar[bool] = False  # builds checkpoints whose layout no family claims (plain CNNs)

    def encoder_at(self, segments: Sequence[str], i: int) -> tuple[str, int] | None:
        """(modality, number of segments) when the module path ``segments`` has one of this family's
        encoders starting at ``segments[i]``."""
        modality = self.encoders.get(segments[i])
        return (modality, 1) if modality else None

    def claims(self, evidence: LayoutEvidence) -> bool:
        """Whether a checkpoint with two or more encoders is of this family's layout."""
        return False

    def fusion_of(self, head_names: list[str]) -> str | None:
        """The fusion, given the names of the linear layers outside the encoders."""
        return self.fusion

    def spec(self, store: TensorStore, fusion: str | None) -> ArchSpec | None:
        """The spec these tensors fit (names without outer prefixes), or None."""
        return None

    def build(self, spec: ArchSpec) -> nn.Module:
        raise ModelError(f"architecture {self.name!r} cannot build a model")

    def parts(self, model: nn.Module) -> AVParts | None:
        """The audio-visual parts of ``model`` when it is this family's classifier, else None."""
        return None

    def bn_fact(self, name: str, idx: NameIndex) -> ArchFact | None:
        """What BN module ``name`` feeds, when it is a BN of this family, else None."""
        return None


_REGISTRY: dict[str, Architecture] = {}
_ORDER: list[Architecture] = []  # _REGISTRY's families in the order they are tried


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: add the family (one instance of ``cls``) under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"architecture {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    _reorder()
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    _reorder()


def _reorder() -> None:
    _ORDER[:] = sorted(_REGISTRY.values(), key=lambda f: -f.priority)  # stable: registration order breaks ties


def families() -> list[Architecture]:
    """Every registered family, in the order they are tried."""
    return list(_ORDER)


def family(name: str) -> Architecture | None:
    return _REGISTRY.get(name)


def encoder_at(segments: Sequence[str], i: int) -> tuple[str, int] | None:
    """(modality, number of segments) of a known encoder starting at ``segments[i]``, by any family."""
    for f in _ORDER:
        hit = f.encoder_at(segments, i)
        if hit is not None:
            return hit
    return None


def layout_name(evidence: LayoutEvidence) -> str | None:
    """The name of the first family that claims this layout, or None."""
    return next((f.name for f in _ORDER if f.claims(evidence)), None)


def fusion_of(layout: str, head_names: list[str]) -> str | None:
    f = _REGISTRY.get(layout)
    return f.fusion_of(head_names) if f is not None else None


def spec_from_checkpoint(store: TensorStore, layout_name: str, fusion: str | None) -> ArchSpec | None:
    """The built-in architecture these tensors fit, or None when no family claims them.

    The family named by the layout decides; a layout no family claims (single, generic, user) is tried
    on every fallback family."""
    owner = _REGISTRY.get(layout_name)
    if owner is not None and not owner.fallback:
        return owner.spec(store, fusion)
    for f in _ORDER:
        if f.fallback:
            spec = f.spec(store, fusion)
            if spec is not None:
                return spec
    return None


def build(spec: ArchSpec) -> nn.Module:
    f = _REGISTRY.get(spec.name)
    if f is None:
        raise ModelError(f"no registered architecture is named {spec.name!r}")
    return f.build(spec)


def parts_of(model: nn.Module) -> AVParts | None:
    """The audio-visual parts of ``model`` from the family that knows its class, or None."""
    for f in _ORDER:
        parts = f.parts(model)
        if parts is not None:
            return parts
    return None


def bn_fact(name: str, idx: NameIndex) -> ArchFact | None:
    for f in _ORDER:
        fact = f.bn_fact(name, idx)
        if fact is not None:
            return fact
    return None


def out_features(store: TensorStore, head: str | None) -> int | None:
    """The out_features of the linear layer ``head`` (its 2-D weight), or None."""
    key = f"{head}.weight"
    if head is None or key not in store or len(store.info(key).shape) != 2:
        return None
    return store.info(key).shape[0]

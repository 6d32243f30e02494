"""Locate: BatchNorm layers, the conv feeding each, what each feeds, and the modality it belongs to."""

from __future__ import annotations

import re
from dataclasses import dataclass

from avdiag.load import Checkpoint
from avdiag.load.store import TensorStore
from avdiag.locate.architectures import NameIndex, architecture_fact
from avdiag.locate.graph import ZEROING_ACTIVATIONS, GraphFact, graph_facts
from avdiag.locate.modality import Head, Layout, detect_layout, parse_overrides
from avdiag.locate import transformer_layouts  # noqa: F401  (registers the transformer AV layouts)
from avdiag.locate.sequential import ModuleTree, prelu_sibling_fact, sequential_fact

__all__ = ["BNLayer", "Head", "Layout", "Located", "locate", "parse_overrides", "DEFAULT_BN_EPS"]

DEFAULT_BN_EPS = 1e-5
_ROLES = ("weight", "bias", "running_mean", "running_var")


@dataclass
class BNLayer:
    name: str  # module name, without wrapper prefixes
    channels: int
    params: dict[str, str]  # role (weight/bias/running_mean/running_var) -> tensor name
    modality: str
    feeds_activation: str  # yes / no / unknown
    activation: str | None  # e.g. relu, relu6, residual-add, linear
    activation_source: str  # graph:<format> / model:<source> / architecture:<arch> / heuristic:name /
    # sequential-numbering / assumed / none
    conv: str | None  # module name of the conv feeding this BN
    conv_source: str
    eps: float
    eps_source: str  # graph / user / architecture:<arch> / default

    @property
    def can_die(self) -> bool:
        """True when the BN feeds an activation that outputs 0 below a threshold (ReLU and kin)."""
        return self.feeds_activation == "yes" and (self.activation or "") in ZEROING_ACTIVATIONS


@dataclass
class Located:
    layers: list[BNLayer]
    layout: Layout
    consumers_from: str | None = None  # the model whose graph told what each BN feeds, once read


def locate(ckpt: Checkpoint, *, modality_overrides: dict[str, str] | None = None,
           bn_eps: float | None = None, assume_activation: str | None = None) -> Located:
    """Find every BatchNorm layer of ``ckpt`` and everything known about its surroundings.

    ``assume_activation`` (e.g. "relu") is used only where neither the graph, architecture
    knowledge nor the names tell what a BN feeds; such layers are marked ``assumed``. It also names
    the parameter-free module that ``nn.Sequential`` numbering reveals (ReLU when not given).
    """
    store = ckpt.tensors
    layout = detect_layout(store, modality_overrides)
    idx = NameIndex(store.names())
    tree = ModuleTree.of(store)
    graph = graph_facts(ckpt.format, ckpt.graph) if ckpt.graph is not None else {}
    layers = []
    for name, params, channels in find_bn_layers(store):
        layer = _describe(name, params, channels, store, idx, tree, graph.get(name), ckpt.format,
                          bn_eps, assume_activation)
        layer.modality = layout.modality_of(name)
        layers.append(layer)
    return Located(layers, layout)


def find_bn_layers(store: TensorStore) -> list[tuple[str, dict[str, str], int]]:
    """(module name, role -> tensor name, channels) for every module with BN running statistics."""
    found = []
    for n in store.names():
        if not (n == "running_mean" or n.endswith(".running_mean")):
            continue
        base = n[: -len("running_mean")]
        if base + "running_var" not in store:
            continue
        shape = store.info(n).shape
        if len(shape) != 1 or store.info(base + "running_var").shape != shape:
            continue
        params = {r: base + r for r in _ROLES if base + r in store and store.info(base + r).shape == shape}
        found.append((base.rstrip("."), params, shape[0]))
    return found


def _describe(name: str, params: dict[str, str], channels: int, store: TensorStore, idx: NameIndex,
              tree: ModuleTree, fact: GraphFact | None, fmt: str, bn_eps: float | None,
              assume: str | None) -> BNLayer:
    arch = architecture_fact(name, idx)
    if fact is not None and fact.consumer != "mixed":
        act = "output" if fact.consumer == "none" else fact.consumer
        feeds, act_src = fact.feeds_activation, f"graph:{fmt}"
    elif arch is not None:
        feeds, act, act_src = arch.feeds_activation, arch.activation, f"architecture:{arch.architecture}"
    else:
        feeds, act, act_src = _name_heuristic(name)
        if feeds == "unknown":
            feeds, act, act_src = (sequential_fact(name, channels, tree, assume)
                                   or prelu_sibling_fact(name, channels, tree) or (feeds, act, act_src))
        if feeds == "unknown" and assume:
            feeds, act, act_src = "yes", assume, "assumed"
    conv, conv_src = _feeding_conv(name, channels, store, fact, arch)
    if fact is not None and fact.eps is not None:
        eps, eps_src = fact.eps, "graph"
    elif bn_eps is not None:
        eps, eps_src = bn_eps, "user"
    elif arch is not None and arch.eps is not None:
        eps, eps_src = arch.eps, f"architecture:{arch.architecture}"
    else:
        eps, eps_src = DEFAULT_BN_EPS, "default"
    return BNLayer(name, channels, params, "", feeds, act, act_src, conv, conv_src, eps, eps_src)


def _name_heuristic(name: str) -> tuple[str, str | None, str]:
    lowered = name.lower()
    if "relu" in lowered:
        return "yes", "relu", "heuristic:name"
    if re.search(r"(downsample|shortcut|skip|residual)", lowered):
        return "no", "residual-add", "heuristic:name"
    return "unknown", None, "none"


def _feeding_conv(name: str, channels: int, store: TensorStore, fact: GraphFact | None,
                  arch) -> tuple[str | None, str]:
    candidates: list[tuple[str | None, str]] = []
    if fact is not None:
        candidates.append((fact.conv, "graph"))
    if arch is not None:
        candidates.append((arch.conv, f"architecture:{arch.architecture}"))
    candidates += [(c, "heuristic:name") for c in _conv_name_guesses(name)]
    for conv, source in candidates:
        if conv and _is_filter_bank(store, conv + ".weight", channels):
            return conv, source
    previous = _preceding_filter_bank(name, channels, store)
    return (previous, "heuristic:order") if previous else (None, "none")


def _conv_name_guesses(name: str) -> list[str]:
    parent, _, leaf = name.rpartition(".")
    pre = parent + "." if parent else ""
    guesses = []
    for pattern, repl in ((r"bn", "conv"), (r"BN", "conv"), (r"norm", "conv"), (r"_?bn$", ""), (r"_?BN$", "")):
        g = re.sub(pattern, repl, leaf)
        if g and g != leaf:
            guesses.append(pre + g)
    if leaf.isdigit() and int(leaf) > 0:
        guesses.append(pre + str(int(leaf) - 1))
    return guesses


def _is_filter_bank(store: TensorStore, tensor: str, channels: int) -> bool:
    if tensor not in store:
        return False
    shape = store.info(tensor).shape
    return len(shape) >= 3 and shape[0] == channels


def _preceding_filter_bank(name: str, channels: int, store: TensorStore) -> str | None:
    """State-dict order follows module registration: the nearest conv weight before this BN."""
    names = store.names()
    first = next((i for i, n in enumerate(names) if n.startswith(name + ".")), None)
    if first is None:
        return None
    for n in reversed(names[:first]):
        if n.endswith(".weight") and _is_filter_bank(store, n, channels):
            return n[: -len(".weight")]
        if n.endswith("running_var"):
            return None  # another BN in between: the order tells nothing
    return None

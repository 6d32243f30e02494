"""What a BatchNorm feeds, read from ``nn.Sequential`` numbering when nothing better is known.

An ``nn.Sequential`` names its children 0, 1, 2, ... and the state dict holds tensors only for the
children that have some. So a BN at index k of a Sequential, with no tensors at k+1 and a conv or
linear layer at k+2 or later, sits before a parameter-free module: in practice an activation
(sometimes a pooling layer, or a pooling layer and then an activation). Such a BN is counted as
feeding a ReLU (or what ``--assume-activation`` names), with the activation source
``sequential-numbering``. The same holds for the last BN of a Sequential when the next block is
another Sequential starting with a conv or linear layer (VGG-style stacks of conv-BN-ReLU blocks).

Two cases are certain rather than likely: a conv or linear layer right at k+1 reads the BN output
directly (no activation), and a module at k+1 holding only a per-channel (or single) weight is a
PReLU (not zeroing: never dead). Outside Sequentials, a BN ``bn<k>`` with a sibling ``relu<k>`` (or
``prelu<k>``, ``act<k>``) that holds such a weight is in a block whose activations are PReLUs
(AV-HuBERT's ResNet blocks): not zeroing either.

Limits: an ``nn.ModuleList`` is numbered the same way but runs in whatever order its owner's forward
says; a pooling layer alone between a BN and the next conv makes the rule call the BN's channels dead
when nothing zeroes them. The data probe (``inspect --data``) or ``--model`` settles both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from avdiag.load.store import TensorStore

SOURCE = "sequential-numbering"
PRELU_SIBLING = "heuristic:prelu-sibling"
_LEARNED = ("conv", "linear")
_ASCEND = 3  # how many enclosing modules the search for "the next block" climbs


@dataclass
class ModuleTree:
    """The module hierarchy behind a checkpoint's tensor names (modules that hold tensors, and their parents)."""

    children: dict[str, list[str]] = field(default_factory=dict)  # module -> child segments, first-seen order
    own: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # module -> its tensors' shapes

    @classmethod
    def of(cls, store: TensorStore) -> "ModuleTree":
        tree = cls()
        for name in store.names():
            module, _, leaf = name.rpartition(".")
            tree.own.setdefault(module, {})[leaf] = tuple(store.info(name).shape)
            tree._add_path(module)
        return tree

    def _add_path(self, module: str) -> None:
        parent = ""
        for part in module.split(".") if module else []:
            kids = self.children.setdefault(parent, [])
            if part not in kids:
                kids.append(part)
            parent = _join(parent, part)

    def ordered_children(self, module: str) -> list[str]:
        """Child segments in execution order as far as names tell: numerically for a Sequential, else first seen."""
        kids = self.children.get(module, [])
        return sorted(kids, key=int) if self.is_numbered(module) else list(kids)

    def is_numbered(self, module: str) -> bool:
        kids = self.children.get(module, [])
        return bool(kids) and all(k.isdigit() for k in kids)

    def kind(self, module: str) -> str:
        """bn / conv / linear / per-channel-weight / other; a container takes its first child's kind."""
        own = self.own.get(module)
        if own:
            return _kind_of(own)
        kids = self.ordered_children(module)
        return self.kind(_join(module, kids[0])) if kids else "other"

    def next_block(self, module: str) -> str | None:
        """The module that follows ``module`` among its siblings, climbing to enclosing modules when
        ``module`` is the last one."""
        current = module
        for _ in range(_ASCEND):
            if not current:
                return None
            parent, _, segment = current.rpartition(".")
            siblings = self.ordered_children(parent)
            position = siblings.index(segment)
            if position + 1 < len(siblings):
                return _join(parent, siblings[position + 1])
            current = parent
        return None


def _join(parent: str, segment: str) -> str:
    return f"{parent}.{segment}" if parent else segment


def _kind_of(own: dict[str, tuple[int, ...]]) -> str:
    if "running_mean" in own:
        return "bn"
    weight = own.get("weight")
    if weight is None:
        return "other"
    if len(weight) >= 3:
        return "conv"
    if len(weight) == 2:
        return "linear"
    if len(weight) == 1 and set(own) == {"weight"}:
        return "per-channel-weight"
    return "other"


def sequential_fact(name: str, channels: int, tree: ModuleTree,
                    assume: str | None = None) -> tuple[str, str, str] | None:
    """(feeds_activation, activation, source) for BN module ``name`` from Sequential numbering, or None."""
    parent, _, leaf = name.rpartition(".")
    if not leaf.isdigit() or not tree.is_numbered(parent):
        return None
    k = int(leaf)
    later = [int(s) for s in tree.ordered_children(parent) if int(s) > k]
    if later:
        return _before(_join(parent, str(later[0])), later[0] - k, channels, tree, assume)
    block = tree.next_block(parent)
    if block is not None and tree.is_numbered(block) and tree.kind(block) in _LEARNED:
        return "yes", assume or "relu", SOURCE
    return None


def prelu_sibling_fact(name: str, channels: int, tree: ModuleTree) -> tuple[str, str, str] | None:
    """A BN ``bn<k>`` next to a PReLU named ``relu<k>`` / ``prelu<k>`` / ``act<k>`` (a module holding only a
    weight of 1 or ``channels`` values, as AV-HuBERT's ResNet blocks have): the block's activation is a PReLU,
    which never zeroes a channel. (The block's second BN feeds the residual add before its PReLU: not
    zeroing either.)"""
    parent, _, leaf = name.rpartition(".")
    match = re.fullmatch(r"(?:bn|norm|batchnorm|batch_norm)_?(\d*)", leaf.lower())
    if match is None:
        return None
    wanted = re.compile(rf"(?:p?relu|act|activation)_?{match.group(1)}")
    for sibling in tree.children.get(parent, []):
        module = _join(parent, sibling)
        if wanted.fullmatch(sibling.lower()) and tree.kind(module) == "per-channel-weight" \
                and tree.own[module]["weight"][0] in (1, channels):
            return "yes", "prelu", PRELU_SIBLING
    return None


def _before(successor: str, gap: int, channels: int, tree: ModuleTree,
            assume: str | None) -> tuple[str, str, str] | None:
    kind = tree.kind(successor)
    if gap == 1:
        if kind in _LEARNED:
            return "no", kind, SOURCE  # the next layer reads the BN output directly
        if kind == "per-channel-weight" and tree.own[successor]["weight"][0] in (1, channels):
            return "yes", "prelu", SOURCE
        return None
    if kind in _LEARNED:
        return "yes", assume or "relu", SOURCE
    return None

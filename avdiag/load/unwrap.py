"""Find the state dict inside whatever a training script saved, and say how it was found."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Tried in this order at each level of nesting.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
# Whole-key prefixes added by wrappers: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
COMPILE_INFIX = "._orig_mod."
_MAX_DEPTH = 4


@dataclass(frozen=True)
class Unwrapped:
    kind: str  # "key", "lightning", "prefix", "module"
    value: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}


def find_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], list[Unwrapped], list[str]]:
    """Return (tensors by name, unwrap steps, other top-level entries) for a loaded checkpoint."""
    steps: list[Unwrapped] = []
    extras = [str(k) for k in obj if not isinstance(obj[k], torch.Tensor)] if isinstance(obj, Mapping) else []
    found = _descend(obj, steps, depth=0)
    if found is None:
        return {}, steps, extras
    tensors = {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if steps:
        top = steps[0].value
        extras = [e for e in extras if e != top]
    else:
        extras = []
    return tensors, steps, extras


def _descend(obj: Any, steps: list[Unwrapped], depth: int) -> Mapping | None:
    if isinstance(obj, torch.nn.Module):
        steps.append(Unwrapped("module", type(obj).__name__))
        return obj.state_dict()
    if not isinstance(obj, Mapping) or depth > _MAX_DEPTH:
        return None
    lightning = depth == 0 and "pytorch-lightning_version" in obj
    # A known key holding a mapping of tensors wins over tensors lying next to it (e.g. a best_acc).
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], Mapping) and _count_tensors(obj[key]) > 0:
            steps.append(Unwrapped("lightning" if lightning and key == "state_dict" else "key", key))
            found = _descend(obj[key], steps, depth + 1)
            if found is not None:
                return found
            steps.pop()
    if _is_tensor_mapping(obj):
        return obj
    best = max(
        (k for k in obj if isinstance(obj[k], Mapping)),
        key=lambda k: _count_tensors(obj[k]),
        default=None,
    )
    if best is not None and _count_tensors(obj[best]) > 0:
        steps.append(Unwrapped("key", str(best)))
        found = _descend(obj[best], steps, depth + 1)
        if found is not None:
            return found
        steps.pop()
    return None


def _is_tensor_mapping(obj: Mapping) -> bool:
    n = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return n > 0 and n * 2 >= len(obj)


def _count_tensors(obj: Any, depth: int = 0) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, Mapping) and depth <= _MAX_DEPTH:
        return sum(_count_tensors(v, depth + 1) for v in obj.values())
    return 0


def strip_wrapper_prefixes(names: list[str]) -> tuple[dict[str, str], list[Unwrapped]]:
    """Map each name to its name without DataParallel/compile prefixes; return the steps taken."""
    steps: list[Unwrapped] = []
    mapping = {n: n for n in names}
    changed = True
    while changed and mapping:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(v.startswith(prefix) for v in mapping.values()):
                mapping = {k: v[len(prefix):] for k, v in mapping.items()}
                steps.append(Unwrapped("prefix", prefix))
                changed = True
    if any(COMPILE_INFIX in v for v in mapping.values()):
        mapping = {k: v.replace(COMPILE_INFIX, ".") for k, v in mapping.items()}
        steps.append(Unwrapped("prefix", COMPILE_INFIX.strip(".") + " (inner)"))
    if len(set(mapping.values())) != len(mapping):
        return {n: n for n in names}, []
    return mapping, steps

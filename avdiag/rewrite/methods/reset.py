"""``--method reset``: the ABRi paper's baselines (Feng, Xia, Hu 2023): every BatchNorm back to a fresh
one (gamma 1, beta 0, mean 0, var 1), or only the channels whose |gamma| is tiny."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avdiag.rewrite.methods.base import Method, Rewrite, RewriteInput, one_of, register

VARIANTS = ("all", "tiny-gamma")
FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


@dataclass
class ResetOptions:
    """``variant``: ``all`` (every BN layer in scope) or ``tiny-gamma`` (only channels with
    |gamma| < ``tiny_gamma``, 1e-6)."""

    variant: str = "all"
    tiny_gamma: float = 1e-6


def validate(o: ResetOptions, has_data: bool) -> None:
    one_of(o.variant, VARIANTS, "--variant")


def apply(target: RewriteInput, o: ResetOptions) -> Rewrite:
    tensors: dict[str, torch.Tensor] = {}
    touched = []
    scope: dict[str, list[int] | None] = {}
    for v in target.scoped_layers():
        layer = v.layer
        if "weight" not in layer.params:
            continue
        rows = _rows(target.affine(layer)[0], o)
        if rows is None:
            continue
        for role, value in FRESH.items():
            if role in layer.params:
                t = target.tensor(layer.params[role]).clone()
                t[rows] = value
                tensors[layer.params[role]] = t
        touched.append(layer.name)
        scope[layer.name] = None if isinstance(rows, slice) else rows.tolist()
    return Rewrite(tensors, {"method": "reset", "variant": o.variant, "tiny_gamma": o.tiny_gamma,
                             "modality": target.modality, "layers": touched}, scope=scope)


def _rows(gamma: torch.Tensor, o: ResetOptions) -> slice | torch.Tensor | None:
    """The channels to reset (None: none in this layer)."""
    if o.variant == "all":
        return slice(None)
    idx = torch.nonzero(gamma.abs() < o.tiny_gamma).flatten()
    return idx if idx.numel() else None


METHOD = register(Method(name="reset", options=ResetOptions, apply=apply, validate=validate,
                         description="reset BatchNorm layers (or tiny-gamma channels) to a fresh BN"))

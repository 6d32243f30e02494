"""Re-learning (Diagnosing & Re-learning, Wei, Li, Feng, Hu, ECCV 2024): a soft re-initialisation of
each encoder towards its initial weights, with the strength alpha_m that the learning state
(:mod:`avdiag.measure.contribution.learning_state`) gives: theta <- alpha_m * theta_init +
(1 - alpha_m) * theta over the encoder's conv weights and BN gamma/beta (not running statistics, not
the heads). In an encoder without BatchNorm (a transformer) the same rule reads: the weight of every
layer (conv, linear, attention projections, embedding: two or more dimensions) and the gamma/beta
of every normalisation layer (a one-dimensional weight); biases, positional embeddings and tokens
stay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def soft_reinit(current: torch.Tensor, initial: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * theta_init + (1 - alpha) * theta, in the tensor's own dtype."""
    mixed = alpha * initial.double() + (1.0 - alpha) * current.double()
    return mixed.to(current.dtype)


def relearn_targets(names: list[str], shapes: dict[str, tuple], in_encoder: Callable[[str], bool]) -> list[str]:
    """The tensors D&R re-initialises inside one encoder (the names ``in_encoder`` accepts): with
    BatchNorm, conv weights and BN gamma/beta, as the paper; without, every layer weight and
    normalisation gamma/beta."""
    mine = [n for n in names if in_encoder(n)]
    batchnorms = {n.rsplit(".", 1)[0] for n in mine if n.endswith(".running_mean")}
    if batchnorms:  # the paper's rule: conv weights and BN gamma/beta
        norms, min_dims = batchnorms, 3
    else:  # no BatchNorm (a transformer): every layer weight and norm gamma/beta
        norms = {n.rsplit(".", 1)[0] for n in mine if n.endswith(".weight") and len(shapes[n]) == 1}
        min_dims = 2
    out = []
    for n in mine:
        module, _, leaf = n.rpartition(".")
        if module in norms and leaf in ("weight", "bias"):
            out.append(n)
        elif (leaf == "weight" or leaf.endswith("_weight")) and len(shapes[n]) >= min_dims:  # in_proj_weight too
            out.append(n)
    return out

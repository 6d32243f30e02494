"""Re-learning (Diagnosing & Re-learning, Wei, Li, Feng, Hu, ECCV 2024): a soft re-initialisation of
each encoder towards its initial weights, with the strength alpha_m that the learning state
(:mod:`avdiag.measure.contribution.learning_state`) gives: theta <- alpha_m * theta_init + (1 - alpha_m) * theta over
the encoder's conv weights and BN gamma/beta (not running statistics, not the heads).
"""

from __future__ import annotations

import torch


def soft_reinit(current: torch.Tensor, initial: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * theta_init + (1 - alpha) * theta, in the tensor's own dtype."""
    mixed = alpha * initial.double() + (1.0 - alpha) * current.double()
    return mixed.to(current.dtype)


def relearn_targets(names: list[str], shapes: dict[str, tuple], prefix: str) -> list[str]:
    """The tensors D&R re-initialises inside one encoder: conv weights and BN gamma/beta."""
    bn = {n.rsplit(".", 1)[0] for n in names if n.startswith(prefix) and n.endswith("running_mean")}
    out = []
    for n in names:
        if not n.startswith(prefix):
            continue
        module, _, leaf = n.rpartition(".")
        if module in bn and leaf in ("weight", "bias"):
            out.append(n)
        elif leaf == "weight" and len(shapes[n]) >= 3:
            out.append(n)
    return out

"""Exact running per-channel mean and variance of activations, cheap on CPU and GPU alike."""

from __future__ import annotations

import torch


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and centred sum of squares of a float (B, C, P) tensor, in float64.

    Each (b, c) row is shifted by its first value and summed in float32, so a constant channel
    gives exactly zero variance and |mean| >> std loses nothing to cancellation; the rows are then
    merged over the batch with Chan et al.'s pairwise formula. (float64 reductions and
    torch.var_mean over full activations run several times slower on CPU.)
    """
    p = x.shape[2]
    shift = x[:, :, :1]
    d = x - shift
    sum_d = d.sum(dim=2).double()
    sq = torch.linalg.vector_norm(d, dim=2).double().square()
    mean_bc = shift[:, :, 0].double() + sum_d / p
    m2_bc = (sq - sum_d.square() / p).clamp_min(0)
    mean = mean_bc.mean(dim=0)
    return mean, m2_bc.sum(dim=0) + p * (mean_bc - mean).square().sum(dim=0)


class RunningMoments:
    """Mean and population variance per channel over every batch added (on the tensors' device)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a (B, C, ...) activation."""
        x = x.detach()
        x = x.reshape(x.shape[0], x.shape[1], -1)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        n = x.shape[0] * x.shape[2]
        if n == 0:
            return
        mean, m2 = batch_moments(x)
        if self.mean is None:
            self.mean, self.m2 = mean, m2
        else:
            total = self.n + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n += n

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)

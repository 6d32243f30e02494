"""Exact per-channel mean and variance of activations, cheap on CPU and GPU alike.

Per batch only the large reductions run, over the last axis of a (B, C, P) activation, and their
(B, C) results are kept on the device: each (b, c) row is shifted by its own first value (so a
constant channel gives exactly zero variance and |mean| >> std loses nothing to cancellation), then
summed and its Euclidean norm taken in float32. That is four kernels a batch and no host
synchronisation. The kept rows are merged in float64 once, when they are read or when enough of
them are pending (so memory stays bounded): per row mean and centred sum of squares, then Chan et
al.'s pairwise formula over rows and over folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows x channels kept per statistic before they are merged: bounds the memory a layer holds
# (1 MiB per float32 statistic) while merging rarely (every 16..256 batches for typical layers).
FOLD_ELEMENTS = 1 << 18


@dataclass
class Moments:
    """Count, mean and centred sum of squares (M2) per channel, in float64."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    def merge(self, other: "Moments") -> "Moments":
        """Chan et al.'s pairwise update: the moments of both sets of positions together."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        total = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / total)
        m2 = self.m2 + other.m2 + delta.square() * (self.n * other.n / total)
        return Moments(total, mean, m2)


def row_sums(x: torch.Tensor, scratch: "Scratch | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (b, c) row of a (B, C, P) floating activation: its first value (the shift, a copy) and
    the sum and Euclidean norm of the row minus its shift, in float32 (float64 for a float64 ``x``;
    a float16/bfloat16 ``x`` is promoted by the subtraction, with no cast of its own). ``scratch``
    holds the shifted copy (see :class:`Scratch`)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    shift = x[:, :, 0].to(dtype, copy=True)
    if scratch is None:
        d = x - shift.unsqueeze(2)
    else:
        d = torch.sub(x, shift.unsqueeze(2), out=scratch.get(x.shape, dtype, x.device))
    return shift, d.sum(dim=2), torch.linalg.vector_norm(d, dim=2)


class Scratch:
    """Reusable buffers for activation-sized temporaries, one per dtype and device, grown as needed.

    On the CPU a fresh activation-sized temporary per layer and batch is memory the allocator hands
    back to the OS and faults in again (the probe's shifted copy and fire mask were over half its
    cost); the layers of a forward pass run one after another, so one buffer serves them all."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= int(size)
        buffer = self.buffers.get((dtype, device))
        if buffer is None or buffer.numel() < n:
            buffer = torch.empty(n, dtype=dtype, device=device)
            self.buffers[(dtype, device)] = buffer
        return buffer[:n].view(shape)


def rows_to_moments(shift: torch.Tensor, total: torch.Tensor, norm: torch.Tensor, p: int) -> Moments:
    """Merge (R, C) row sums of rows of ``p`` positions each into per-channel moments (float64)."""
    total = total.double()
    mean_rows = shift.double() + total / p
    m2_rows = (norm.double().square() - total.square() / p).clamp_min(0)
    return _merge_rows(mean_rows, m2_rows, p)


def mean_var_to_moments(shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, p: int) -> Moments:
    """Merge (R, C) rows of ``p`` positions each, given as the row's shift and the mean and population
    variance of the row minus its shift (:func:`shifted_var_mean`), into per-channel moments (float64)."""
    return _merge_rows(shift.double() + mean.double(), var.double() * p, p)


def shifted_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (b, c) row of a (B, C, P) floating activation: its first value (the shift, a copy) and the
    population variance and mean of the row minus its shift (``torch.var_mean``, Welford's update, in
    float32 or wider). Three kernels, where :func:`row_sums` takes four; the shift keeps the precision
    of rows whose |mean| dwarfs their spread (float32's Welford alone lost 3% of a variance at
    |mean| / std = 5e6)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    shift = x[:, :, 0].to(dtype, copy=True)
    var, mean = torch.var_mean(x - shift.unsqueeze(2), dim=2, correction=0)
    return shift, mean, var


def _merge_rows(mean_rows: torch.Tensor, m2_rows: torch.Tensor, p: int) -> Moments:
    """Per-channel moments of (R, C) rows of ``p`` positions, each row given by its mean and M2."""
    mean = mean_rows.mean(dim=0)
    m2 = m2_rows.sum(dim=0) + p * (mean_rows - mean).square().sum(dim=0)
    return Moments(p * mean_rows.shape[0], mean, m2)


class PendingRows:
    """(B, C) per-batch row statistics kept as they come, grouped by positions per row."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.groups: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.elements = 0
        self.device_type: str | None = None

    def add(self, p: int, **rows: torch.Tensor) -> None:
        group = self.groups.setdefault(p, {name: [] for name in self.names})
        for name in self.names:
            group[name].append(rows[name])
        first = rows[self.names[0]]
        self.elements += first.numel()
        self.device_type = first.device.type

    @property
    def full(self) -> bool:
        """Time to merge: enough rows pending, or any on the CPU, where there is no kernel launch to
        save and small row tensors kept through the forward passes fragment the heap between the large
        activations (the probe's resident memory then grew with the number of batches)."""
        return self.elements >= FOLD_ELEMENTS or self.device_type == "cpu"

    def take(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every pending group, each statistic's rows concatenated; nothing is left pending."""
        out = {p: {name: torch.cat(rows) for name, rows in group.items()} for p, group in self.groups.items()}
        self.groups.clear()
        self.elements = 0
        return out


class RunningMoments:
    """Mean and population variance per channel over every batch added (on the tensors' device).

    ``add`` queues the batch's row sums; they are merged (float64) when ``mean``, ``m2`` or
    ``variance`` is read, or when enough are pending.
    """

    def __init__(self) -> None:
        self.n = 0
        self._merged: Moments | None = None
        self._pending = PendingRows(("shift", "total", "norm"))
        self._pending_mean_var = PendingRows(("shift", "mean", "var"))

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a (B, C, ...) activation."""
        x = x.detach()
        x = x.reshape(x.shape[0], x.shape[1], -1)
        if not x.is_floating_point():
            x = x.float()
        if x.shape[0] * x.shape[2] == 0:
            return
        self.add_rows(x.shape[2], *row_sums(x))

    def add_rows(self, p: int, shift: torch.Tensor, total: torch.Tensor, norm: torch.Tensor) -> None:
        """Queue (B, C) row sums (:func:`row_sums`) of rows of ``p`` positions each."""
        self._pending.add(p, shift=shift, total=total, norm=norm)
        self.n += p * shift.shape[0]
        if self._pending.full:
            self._fold()

    def add_mean_var(self, p: int, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Queue (B, C) rows of ``p`` positions each as :func:`shifted_var_mean` gives them."""
        self._pending_mean_var.add(p, shift=shift, mean=mean, var=var)
        self.n += p * shift.shape[0]
        if self._pending_mean_var.full:
            self._fold()

    def _fold(self) -> Moments | None:
        parts = [rows_to_moments(rows["shift"], rows["total"], rows["norm"], p)
                 for p, rows in self._pending.take().items()]
        parts += [mean_var_to_moments(rows["shift"], rows["mean"], rows["var"], p)
                  for p, rows in self._pending_mean_var.take().items()]
        for part in parts:
            self._merged = part if self._merged is None else self._merged.merge(part)
        return self._merged

    @property
    def mean(self) -> torch.Tensor | None:
        merged = self._fold()
        return merged.mean if merged is not None else None

    @property
    def m2(self) -> torch.Tensor | None:
        merged = self._fold()
        return merged.m2 if merged is not None else None

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)

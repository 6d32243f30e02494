"""Approximate per-sample cosines from a random projection (sketch) of the per-sample gradients.

Opt-in only (``sketch=DIM``; the result then says ``per_sample_exact: false`` and carries the
error measured on the run's own data), never a silent substitute for the exact engine.

Each ``Conv2d`` / ``Linear`` weight gradient ``G_i`` (``Cout x K``) is projected to a
``k_o x k_i`` matrix ``S_i = P_out G_i P_in^T`` with independent standard Gaussian ``P_out``
(``k_o x Cout``) and ``P_in`` (``k_i x K``), ``k_o k_i ~ DIM`` (a side not larger than its ``k`` is
kept whole). ``E[<S1_i, S2_i>] = k_o k_i <G1_i, G2_i>``, so every layer's estimate is scaled by
``1 / (k_o k_i)`` and the layers add up to an unbiased estimate of the encoder's inner products
(biases, BatchNorm and other layers are exact). ``G_i`` is never formed: ``P_in U_i`` is a
convolution of the input with ``k_i`` random filters (``U_i`` the im2col columns) and
``S_i = (P_out delta_i)(P_in U_i)^T``. The projections are drawn from ``seed`` and the layer's
name, so every process of a torchrun group uses the same ones.

The cosine of two sketched vectors has a standard error of about ``(1 - cos^2) / sqrt(DIM x
layers)`` for a dense Gaussian projection; the Kronecker form here is somewhat noisier. The first
:data:`CHECK_SAMPLES` samples of a run (whole chunks) are also measured exactly, and the largest
and mean absolute differences of their cosines are reported (:class:`~avdiag.measure.conflict.results.SketchReport`).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from avdiag.measure.conflict.layers import (
    Call, Env, conv_batch_weight, conv_bias, conv_geometry, conv_padding, f32, linear_batch_weight,
    linear_bias, linear_rows, per_sample_rows, plain_conv, stacked_rows, unfold,
)
from avdiag.measure.conflict.products import chunk_size, gram3, pair_gram

CHECK_SAMPLES = 8  # samples per run measured both ways to state the sketch's error


class Sketch:
    """The projections of one run (``dim`` numbers per layer, drawn from ``seed``)."""

    def __init__(self, dim: int, seed: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"the sketch dimension must be a positive integer, got {dim!r}")
        self.dim = dim
        self.seed = int(seed)
        Factors = tuple[torch.Tensor | None, torch.Tensor | None, float]
        self._factors: dict[tuple[str, str, int, int, torch.dtype], Factors] = {}

    def factors(self, layer: str, rows: int, cols: int, device: torch.device, dtype: torch.dtype = torch.float32):
        """(P_out or None, P_in or None, scale) for a ``rows x cols`` gradient; None keeps that side."""
        key = (layer, str(device), rows, cols, dtype)
        if key not in self._factors:
            k_out = min(rows, max(1, math.isqrt(self.dim)))
            k_in = min(cols, max(1, self.dim // k_out))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(layer.encode()))
            p_out = torch.randn(k_out, rows, generator=gen).to(device, dtype) if k_out < rows else None
            p_in = torch.randn(k_in, cols, generator=gen).to(device, dtype) if k_in < cols else None
            scale = (1.0 / k_out if p_out is not None else 1.0) * (1.0 / k_in if p_in is not None else 1.0)
            self._factors[key] = (p_out, p_in, scale)
        return self._factors[key]

    def products(self, call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
        if plain_conv(call.module):
            return self._conv(call, d1, d2, n, env)
        return self._linear(call, d1, d2, n, env)

    def _conv(self, call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
        mod, x = call.module, call.x
        r, cout, k, length = conv_geometry(call, n)
        p_out, p_in, scale = self.factors(env.layer, cout, k, x.device, f32(x).dtype)
        k_in = k if p_in is None else p_in.shape[0]
        c = chunk_size(n, (k_in + 4 * cout) * length, env.budget)
        out = []
        for s in range(0, n, c):
            e = min(n, s + c)
            m = e - s
            dd = per_sample_rows(stacked_rows(d1, d2, s, e, r), m, r)  # (m, 2 Cout, L)
            if p_in is None:
                z = unfold(mod, x[s * r:e * r], m, r)
            else:
                filters = p_in.view(k_in, mod.in_channels, *mod.kernel_size)
                z = per_sample_rows(F.conv2d(f32(x[s * r:e * r]), filters, None, mod.stride, conv_padding(mod),
                                             mod.dilation), m, r)  # (m, k_in, L)
            q = dd if p_out is None else torch.matmul(p_out, dd.view(m, 2, cout, -1)).reshape(m, -1, dd.shape[2])
            sk = torch.bmm(q, z.transpose(1, 2))  # (m, 2 k_out, k_in)
            res = pair_gram(sk) * scale
            if mod.bias is not None:
                res = res + conv_bias(mod, dd, cout, env.grads, s)
            out.append(res)
        if env.grads is not None:
            conv_batch_weight(call, d1, d2, n, env.grads)
        return torch.cat(out)

    def _linear(self, call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
        mod = call.module
        x, d1, d2 = linear_rows(call, d1, d2, n)
        p_out, p_in, scale = self.factors(env.layer, mod.out_features, mod.in_features, x.device,
                                             f32(x).dtype)
        z = x if p_in is None else x @ p_in.T
        q1, q2 = (d if p_out is None else d @ p_out.T for d in (d1, d2))
        res = gram3(torch.bmm(q1.transpose(1, 2), z), torch.bmm(q2.transpose(1, 2), z)) * scale
        res = res + linear_bias(mod, d1, d2, env.grads, 0)
        if env.grads is not None:
            linear_batch_weight(mod, x, d1, d2, env.grads)
        return res


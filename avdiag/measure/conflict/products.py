"""Inner products and squared norms of gradients, in float64, without float32 underflow.

A well-fit sample's gradient can be so small that its squared entries underflow float32. Every
product here is taken on copies rescaled by a power of two (which only shifts exponents, so it is
exact) and scaled back in float64.
"""

from __future__ import annotations

import math

import torch

from avdiag.measure.precision import f32  # noqa: F401  (the conflict modules import it from here)

F64 = torch.float64


def cosine(dot: float, n1: float, n2: float) -> float:
    """Cosine from an inner product and two SQUARED norms; NaN when a vector is zero."""
    if not (n1 > 0 and n2 > 0):
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(n1 * n2)))


def chunk_size(n: int, per_sample_floats: int, memory_bytes: int) -> int:
    """How many samples fit in ``memory_bytes`` of float32 temporaries (at least one)."""
    return max(1, min(n, memory_bytes // max(1, 4 * per_sample_floats)))


def gram3(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """(c, ...) pairs -> (c, 3) float64: <x1, x2>, |x1|^2, |x2|^2 per leading index (summed in the
    tensors' dtype, torch's cascade summation, then widened)."""
    x1, x2 = x1.flatten(1), x2.flatten(1)
    return torch.stack([(x1 * x2).sum(1), (x1 * x1).sum(1), (x2 * x2).sum(1)], 1).to(F64)


def pair_gram(g: torch.Tensor) -> torch.Tensor:
    """(c, 2, ...) pairs stacked on dim 1 -> (c, 3) float64 as :func:`gram3` of ``g[:, 0]``, ``g[:, 1]``:
    one batched matrix product over the data, no temporary the size of the input."""
    flat = g.reshape(g.shape[0], 2, -1)
    prod = torch.bmm(flat, flat.transpose(1, 2))  # (c, 2, 2)
    return torch.stack([prod[:, 0, 1], prod[:, 0, 0], prod[:, 1, 1]], 1).to(F64)


def pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 ** e`` for an integer tensor, exactly (built from the float64 bit pattern), in ``dtype``."""
    info = torch.finfo(dtype)
    lo, hi = math.ceil(math.log2(info.tiny)) + 1, math.floor(math.log2(info.max)) - 1
    bits = (e.to(torch.int64).clamp(lo, hi) + 1023) << 52
    return bits.view(torch.float64).to(dtype)


def exponent(m: torch.Tensor) -> torch.Tensor:
    """Binary exponent e of m (m = f * 2**e, 0.5 <= f < 1); 0 where m is 0 or not finite."""
    e = torch.frexp(m).exponent
    return torch.where(torch.isfinite(m) & (m > 0), e, torch.zeros_like(e))


def unit_rows(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``c`` by a power of two so that its largest |value| lies in [0.5, 1):
    (scaled rows, the inverse factors in float64). Backward passes from the scaled cotangents give
    exactly the scaled per-sample gradients, while the squares of the tiny gradients of well-fit
    (saturated) samples no longer underflow float32."""
    e = exponent(c.detach().abs().reshape(c.shape[0], -1).amax(1))
    return c * pow2(-e, c.dtype).view(-1, *[1] * (c.dim() - 1)), pow2(e, F64)


def stats3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(3,) float64 <a, b>, |a|^2, |b|^2, computed on copies rescaled by one power of two (no
    underflow or overflow of the squares) and scaled back in float64."""
    m = torch.maximum(a.detach().abs().amax(), b.detach().abs().amax()) if a.numel() else a.new_zeros(())
    e = exponent(m)
    s = pow2(-e, a.dtype)
    a, b = a * s, b * s
    res = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).to(F64)
    return res * pow2(2 * e, F64)

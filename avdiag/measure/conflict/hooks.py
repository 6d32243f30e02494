"""The hooks engine: exact per-sample gradient products without per-sample gradients of the encoder.

One batched forward with forward hooks on every module that owns encoder parameters (``Conv2d``,
``Linear``, eval-mode ``BatchNorm``), two batched backward passes to the module outputs (cotangents:
the per-sample loss gradients at the pooled features), then per sample and module the inner
products ``<G1_i, G2_i>``, ``|G1_i|^2``, ``|G2_i|^2`` of the per-sample weight gradients. For a
convolution either by forming ``G_i = delta_i unfold(x_i)^T`` (on a CPU, from
:data:`DIRECT_MIN_POSITIONS` positions per sample up, by one weight-only convolution backward per
sample instead, which writes no im2col copy) or, when cheaper (small feature maps), without forming
it, as ``sum_pq (delta1_p . delta2_q)(x_p . x_q)`` over positions ``p, q`` (Goodfellow's trick
extended to convolutions). No per-sample gradient of the whole encoder is ever held; samples are
processed in chunks sized by ``memory_bytes``. The visual encoder sees the ``T`` frames of a clip
folded into its batch (:func:`avdiag.models.av.visual_features`): a sample's gradient is the sum
over its frames.

The batch gradients of the encoder parameters come out of the same products (:class:`BatchGrads`:
the sum of the per-sample gradients, or where those are never formed one weight-only convolution
backward), so a batch measured with per-sample cosines costs no extra backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.measure.conflict.gradients import Encoder
from avdiag.measure.conflict.products import F64, chunk_size, gram3, unit_rows

DIRECT_MIN_POSITIONS = 256  # positions per sample from which a CPU convolution takes the direct path


class EngineUnsupported(Exception):
    """The hooks engine cannot handle this encoder / call pattern: use the vmap engine."""


def hookable(mod: nn.Module) -> bool:
    """Whether the engine knows the per-sample weight gradient of ``mod`` (stock forward, zero padding)."""
    t = type(mod)
    if t is nn.Conv2d or (isinstance(mod, nn.Conv2d) and t.forward is nn.Conv2d.forward):
        return (mod.groups == 1 and mod.padding_mode == "zeros"
                and (not isinstance(mod.padding, str) or mod.padding == "valid"))
    if t is nn.Linear or (isinstance(mod, nn.Linear) and t.forward is nn.Linear.forward):
        return True
    bn = nn.modules.batchnorm._BatchNorm
    if isinstance(mod, bn) and t.forward is bn.forward:
        return mod.running_mean is not None and mod.running_var is not None
    return False


def hooks_apply(enc: Encoder) -> bool:
    return not enc.shares_parameters and all(hookable(m) for m in enc.modules)


class Capture:
    """Forward hooks recording (input, output) of every parameterised module of an encoder. The
    hook returns a clone of the output, so in-place ops downstream (``ReLU(inplace=True)``) leave
    the recorded output, the tensor differentiated against, intact."""

    def __init__(self, enc: Encoder, stack: ExitStack):
        self.enc = enc
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in enc.modules]
        for i, mod in enumerate(enc.modules):
            handle = mod.register_forward_hook(self._hook(i))
            stack.callback(handle.remove)

    def _hook(self, i: int) -> Callable:
        def hook(_mod, inputs, output):
            self.calls[i].append((inputs[0].detach(), output))
            return output.clone()

        return hook

    def outputs(self) -> list[torch.Tensor]:
        if any(len(c) != 1 for c in self.calls):
            raise EngineUnsupported("a parameterised module ran more or less than once")
        return [c[0][1] for c in self.calls]


class BatchGrads:
    """Batch gradients of the encoder parameters rebuilt from per-sample ones: the per-sample
    cotangents were multiplied by powers of two (:func:`unit_rows`), so sample ``i``'s gradient is
    ``inv[i]`` times what the scaled pass gives; ``grads[id(param)] = (g1, g2)``."""

    def __init__(self, inv1: torch.Tensor, inv2: torch.Tensor):
        self.inv = (inv1, inv2)
        self.grads: dict[int, list[torch.Tensor | None]] = {}

    def add(self, param: torch.Tensor, per_sample1: torch.Tensor, per_sample2: torch.Tensor, start: int) -> None:
        """Accumulate sum_i inv[i] * per_sample[i] over the samples ``start .. start + len``."""
        acc = self.grads.setdefault(id(param), [None, None])
        for j, ps in enumerate((per_sample1, per_sample2)):
            w = self.inv[j][start:start + ps.shape[0]].to(ps.dtype)
            g = (w @ ps.reshape(ps.shape[0], -1)).reshape(param.shape)
            acc[j] = g if acc[j] is None else acc[j] + g

    def set(self, param: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> None:
        self.grads[id(param)] = [g1.reshape(param.shape), g2.reshape(param.shape)]

    def row_weights(self, j: int, rows_per_sample: int) -> torch.Tensor:
        return self.inv[j].repeat_interleave(rows_per_sample)


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int]) -> torch.Tensor:
    """``F.unfold(x, kernel, dilation, padding, stride)``, (N, C*kh*kw, L), from strided windows
    (one copy; faster than ``F.unfold`` on CPU)."""
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    v = x.unfold(2, dilation[0] * (kernel[0] - 1) + 1, stride[0])
    if dilation[0] > 1:
        v = v[..., ::dilation[0]]
    v = v.unfold(3, dilation[1] * (kernel[1] - 1) + 1, stride[1])
    if dilation[1] > 1:
        v = v[..., ::dilation[1]]
    n, c, ho, wo = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kernel[0] * kernel[1], ho * wo)


def conv_products(mod: nn.Conv2d, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, n: int,
                  memory_bytes: int, grads: BatchGrads | None) -> torch.Tensor:
    """Per-sample products of a convolution; with ``grads``, its batch gradients go there too."""
    r = x.shape[0] // n  # rows (frames) per sample
    cout = d1.shape[1]
    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    length = r * d1.shape[2] * d1.shape[3]  # positions per sample
    ghost = length * length * (k + 3 * cout) < 2 * cout * k * length
    per_sample = k * length + (4 * length * length if ghost else 2 * cout * k) + 4 * cout * length
    c = chunk_size(n, per_sample, memory_bytes)
    padding = (0, 0) if mod.padding == "valid" else mod.padding
    # on a CPU, per-sample weight gradients from one weight-only convolution backward per sample
    # beat im2col + bmm once a sample has a few hundred positions (no im2col copy to write)
    direct = not ghost and x.device.type == "cpu" and length >= DIRECT_MIN_POSITIONS
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        m = e - s
        rows = torch.cat([d1[s * r:e * r], d2[s * r:e * r]], 1)
        dd = rows.reshape(m, r, 2 * cout, -1)
        if r > 1:
            dd = dd.transpose(1, 2)
        dd = dd.reshape(m, 2 * cout, length)  # (m, [delta1; delta2], positions)
        if direct:
            g = direct_weight_grads(mod, x[s * r:e * r], rows, r, padding)  # (m, 2 Cout, K)
        elif not ghost:
            g = torch.bmm(dd, unfold(mod, x[s * r:e * r], m, r, padding).transpose(1, 2))
        if ghost:
            u = unfold(mod, x[s * r:e * r], m, r, padding)
            gram_x = torch.bmm(u.transpose(1, 2), u)  # (m, L, L)
            g1, g2 = dd[:, :cout], dd[:, cout:]
            res = torch.stack([
                (torch.bmm(g1.transpose(1, 2), g2) * gram_x).sum((1, 2)),
                (torch.bmm(g1.transpose(1, 2), g1) * gram_x).sum((1, 2)),
                (torch.bmm(g2.transpose(1, 2), g2) * gram_x).sum((1, 2))], 1).to(F64)
        else:  # g: (m, 2 Cout, K), the per-sample weight gradients
            res = gram3(g[:, :cout], g[:, cout:])
            if grads is not None:
                grads.add(mod.weight, g[:, :cout], g[:, cout:], s)
        if mod.bias is not None:
            bias = dd.sum(2)
            res = res + gram3(bias[:, :cout], bias[:, cout:])
            if grads is not None:
                grads.add(mod.bias, bias[:, :cout], bias[:, cout:], s)
        out.append(res)
    if grads is not None and ghost:  # batch weight gradients: one weight-only convolution backward
        w1, w2 = (grads.row_weights(j, r).to(d1.dtype).view(-1, 1, 1, 1) for j in (0, 1))
        wgrad = torch.ops.aten.convolution_backward(
            torch.cat([d1 * w1, d2 * w2], 1), x, torch.cat([mod.weight.detach(), mod.weight.detach()]), None,
            mod.stride, padding, mod.dilation, False, (0, 0), 1, (False, True, False))[1]
        grads.set(mod.weight, wgrad[:cout], wgrad[cout:])
    return torch.cat(out)


def unfold(mod: nn.Conv2d, x: torch.Tensor, m: int, r: int, padding) -> torch.Tensor:
    """(m, K, positions): the im2col columns of ``m`` samples of ``r`` frames each."""
    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    u = im2col(x, mod.kernel_size, mod.stride, padding, mod.dilation)
    if r > 1:
        u = u.reshape(m, r, k, -1).transpose(1, 2)
    return u.reshape(m, k, -1)


def direct_weight_grads(mod: nn.Conv2d, x: torch.Tensor, dd: torch.Tensor, r: int, padding) -> torch.Tensor:
    """(m, 2 Cout, K) per-sample weight gradients for the cotangents ``dd`` = [delta1; delta2]
    (rows of ``r`` frames per sample), one weight-only convolution backward per sample."""
    w2 = torch.cat([mod.weight.detach(), mod.weight.detach()])
    out = [torch.ops.aten.convolution_backward(dd[i:i + r], x[i:i + r], w2, None, mod.stride, padding, mod.dilation,
                                               False, (0, 0), 1, (False, True, False))[1]
           for i in range(0, x.shape[0], r)]
    return torch.stack(out).flatten(2)


def linear_products(mod: nn.Linear, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, n: int,
                    memory_bytes: int, grads: BatchGrads | None) -> torch.Tensor:
    x = x.reshape(n, -1, x.shape[-1])
    d1 = d1.reshape(n, -1, d1.shape[-1])
    d2 = d2.reshape(n, -1, d2.shape[-1])
    c = chunk_size(n, 2 * d1.shape[2] * x.shape[2], memory_bytes)
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        g1 = torch.bmm(d1[s:e].transpose(1, 2), x[s:e])
        g2 = torch.bmm(d2[s:e].transpose(1, 2), x[s:e])
        res = gram3(g1, g2)
        if grads is not None:
            grads.add(mod.weight, g1, g2, s)
        if mod.bias is not None:
            b1, b2 = d1[s:e].sum(1), d2[s:e].sum(1)
            res = res + gram3(b1, b2)
            if grads is not None:
                grads.add(mod.bias, b1, b2, s)
        out.append(res)
    return torch.cat(out)


def bn_products(mod: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                n: int, grads: BatchGrads | None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
    dims = tuple(range(2, x.dim()))

    def per_sample(t: torch.Tensor) -> torch.Tensor:  # (rows, C, ...) -> (n, C)
        t = t.sum(dims) if dims else t
        return t.reshape(n, -1, t.shape[1]).sum(1)

    res = torch.zeros(n, 3, dtype=F64, device=x.device)
    for param, pair in ((mod.weight, lambda: (d1 * xhat, d2 * xhat)), (mod.bias, lambda: (d1, d2))):
        if param is None:
            continue
        q1, q2 = (per_sample(t) for t in pair())
        res = res + gram3(q1, q2)
        if grads is not None:
            grads.add(param, q1, q2, 0)
    return res


def hooks_products(enc: Encoder, cap: Capture, deltas1: Sequence[torch.Tensor | None],
                   deltas2: Sequence[torch.Tensor | None], n: int, memory_bytes: int,
                   grads: BatchGrads | None = None) -> torch.Tensor:
    """(n, 3) float64 per-sample <g1_i, g2_i>, |g1_i|^2, |g2_i|^2 over the whole encoder; with
    ``grads``, the batch gradients of every encoder parameter are gathered there too."""
    total = None
    for mod, calls, d1, d2 in zip(enc.modules, cap.calls, deltas1, deltas2):
        x, out = calls[0]
        d1 = torch.zeros_like(out) if d1 is None else d1
        d2 = torch.zeros_like(out) if d2 is None else d2
        if x.shape[0] % n:
            raise EngineUnsupported("a module's batch is not a multiple of the number of samples")
        if isinstance(mod, nn.Conv2d):
            res = conv_products(mod, x, d1, d2, n, memory_bytes, grads)
        elif isinstance(mod, nn.Linear):
            res = linear_products(mod, x, d1, d2, n, memory_bytes, grads)
        else:
            res = bn_products(mod, x, d1, d2, n, grads)
        total = res if total is None else total + res
    return total if total is not None else torch.zeros(n, 3, dtype=F64)




def capture(encs: dict[str, Encoder], stack: ExitStack) -> dict[str, Capture]:
    """Hooks on every parameterised module of each encoder, removed when ``stack`` closes."""
    return {m: Capture(e, stack) for m, e in encs.items()}


def encoder_products(enc: Encoder, cap: Capture, feature: torch.Tensor, cot1: torch.Tensor, cot2: torch.Tensor,
                     memory_bytes: int, batch_grads: bool = False) -> tuple[torch.Tensor, BatchGrads | None]:
    """(n, 3) per-sample products of encoder ``enc`` for the cotangents ``cot1``, ``cot2`` at its
    pooled ``feature`` (rows scaled to unit range first, see :func:`unit_rows`); with
    ``batch_grads``, also the batch gradients of its parameters. Frees ``feature``'s graph."""
    (c1, inv1), (c2, inv2) = unit_rows(cot1), unit_rows(cot2)
    outs = cap.outputs()
    d1 = torch.autograd.grad(feature, outs, c1, retain_graph=True, allow_unused=True)
    d2 = torch.autograd.grad(feature, outs, c2, allow_unused=True)
    grads = BatchGrads(inv1, inv2) if batch_grads else None
    return hooks_products(enc, cap, d1, d2, int(cot1.shape[0]), memory_bytes, grads), grads

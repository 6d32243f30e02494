"""Per-layer methods of the module-products engine: for one module, the per-sample products
``<G1_i, G2_i>``, ``|G1_i|^2``, ``|G2_i|^2``, where ``G_i`` is sample ``i``'s gradient of the module's
own parameters for the output cotangent ``delta_i`` (two cotangents: the multimodal and the
uni-modal loss), from the module's recorded input and the gradients at its output.

=================  =====================================  ============================================
method             applies to                             how
=================  =====================================  ============================================
``im2col``         ``Conv2d`` (groups 1, zero padding)    ``G_i = delta_i unfold(x_i)^T``, one bmm
``direct``         ``Conv2d``                             one weight-only convolution backward per
                                                          sample: the batch-size-1 loop's own kernel
``grouped``        ``Conv2d``                             one grouped convolution backward, a group
                                                          per sample
``gram``           ``Conv2d``, ``Linear``                 never forms ``G_i``: ``sum_pq (delta1_p .
                                                          delta2_q)(x_p . x_q)`` over positions
``outer``          ``Linear``                             ``G_i = delta_i^T x_i``, one bmm
``elementwise``    eval-mode ``BatchNorm``                per-channel sums
``vmap``           any module                             ``torch.func.vmap`` over ``vjp`` of the
                                                          module alone, its own parameters only
``loop``           any module                             the module re-run per sample, autograd
``sketch``         ``Conv2d``, ``Linear``                 approximate: a random projection (see
                                                          :mod:`~avdiag.measure.conflict.sketch`)
=================  =====================================  ============================================

Half-precision inputs and gradients (``--amp``) are multiplied in float32, and the generic methods
re-run their module in float32. Every method also adds, when asked (:class:`BatchGrads`), the
batch gradients of the module's parameters: the weighted sum of the per-sample gradients it formed, or, for ``gram`` and
``sketch``, one weight-only convolution backward (or one matmul) over the chunk. Each method's
:attr:`Method.cost` estimates its multiply-adds per sample; :mod:`~avdiag.measure.conflict.select`
uses it to drop hopeless candidates before timing the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.measure.conflict.products import F64, chunk_size, f32, gram3, pair_gram

FLOATS = 4  # bytes per float32 element


@dataclass
class Call:
    """One run of a parameterised module in a chunk's forward: its own parameters (as the encoder
    groups them), its detached inputs, and the recorded output the gradients are taken at."""

    module: nn.Module
    params: list[nn.Parameter]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    def part(self, start: int, end: int, n: int) -> "Call":
        """The call restricted to samples ``start .. end`` of its ``n`` (their rows of every input
        and of the output)."""
        rows = self.output.shape[0]
        r = rows // n

        def cut(a: Any) -> Any:
            is_rows = isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == rows
            return a[start * r:end * r] if is_rows else a

        return Call(self.module, self.params, tuple(cut(a) for a in self.args), self.kwargs, cut(self.output))


class BatchGrads:
    """The batch gradients ``(g1, g2)`` of every parameter, accumulated over chunks. The cotangents
    of a chunk were scaled per sample (:func:`~avdiag.measure.conflict.products.unit_rows`); ``inv``
    holds the factors that undo the scaling and give each sample its share of the batch-mean loss."""

    def __init__(self) -> None:
        self.grads: dict[int, list[torch.Tensor | None]] = {}
        self.inv: tuple[torch.Tensor, torch.Tensor] | None = None

    def start_chunk(self, inv1: torch.Tensor, inv2: torch.Tensor) -> None:
        self.inv = (inv1, inv2)

    def fork(self, start: int = 0, end: int | None = None) -> "BatchGrads":
        """An empty sink with the factors of samples ``start .. end`` of this chunk (for a trial
        whose result may be dropped, or a part of the chunk)."""
        sink = BatchGrads()
        sink.inv = (self.inv[0][start:end], self.inv[1][start:end])
        return sink

    def merge(self, other: "BatchGrads") -> None:
        for key, (g1, g2) in other.grads.items():
            self._accumulate(key, 0, g1)
            self._accumulate(key, 1, g2)

    def _accumulate(self, key: int, j: int, g: torch.Tensor | None) -> None:
        if g is None:
            return
        acc = self.grads.setdefault(key, [None, None])
        acc[j] = g if acc[j] is None else acc[j] + g

    def add(self, param: torch.Tensor, per_sample1: torch.Tensor, per_sample2: torch.Tensor, start: int) -> None:
        """Accumulate ``sum_i inv[i] * per_sample[i]`` over the chunk's samples ``start .. start + len``."""
        for j, ps in enumerate((per_sample1, per_sample2)):
            w = self.inv[j][start:start + ps.shape[0]].to(ps.dtype)
            self._accumulate(id(param), j, (w @ ps.reshape(ps.shape[0], -1)).reshape(param.shape))

    def add_sum(self, param: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> None:
        """Accumulate gradients already summed over the chunk with :meth:`row_weights`."""
        self._accumulate(id(param), 0, g1.reshape(param.shape))
        self._accumulate(id(param), 1, g2.reshape(param.shape))

    def row_weights(self, j: int, rows_per_sample: int) -> torch.Tensor:
        return self.inv[j].repeat_interleave(rows_per_sample)

    def get(self, param: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g = self.grads.get(id(param), [None, None])
        return g[0], g[1]


@dataclass
class Env:
    """What a method may use besides the call: the bytes its temporaries may take, where batch
    gradients go (None: not needed), the sketch (for ``sketch``) and the layer's name."""

    budget: int
    grads: BatchGrads | None = None
    sketch: Any = None
    layer: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    applies: Callable[[Call], bool]
    cost: Callable[[Call, int, bool], float]  # (call, samples, batch grads wanted) -> multiply-adds per sample
    run: Callable[[Call, torch.Tensor, torch.Tensor, int, Env], torch.Tensor]  # -> (n, 3) float64
    exact: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)


# ---- convolutions ---------------------------------------------------------------------------------


def plain_conv(mod: nn.Module) -> bool:
    """A Conv2d with the stock forward, one group and zero padding (not 'same')."""
    if not isinstance(mod, nn.Conv2d) or type(mod).forward is not nn.Conv2d.forward:
        return False
    return (mod.groups == 1 and mod.padding_mode == "zeros"
            and (not isinstance(mod.padding, str) or mod.padding == "valid"))


def conv_padding(mod: nn.Conv2d) -> tuple[int, int]:
    return (0, 0) if mod.padding == "valid" else tuple(mod.padding)


def conv_geometry(call: Call, n: int) -> tuple[int, int, int, int]:
    """(rows (frames) per sample, Cout, K = Cin kh kw, positions per sample over its frames)."""
    mod = call.module
    r = call.x.shape[0] // n
    out = call.output
    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    return r, mod.out_channels, k, r * out.shape[2] * out.shape[3]


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


def unfold(mod: nn.Conv2d, x: torch.Tensor, m: int, r: int) -> torch.Tensor:
    """(m, K, positions): the im2col columns of ``m`` samples of ``r`` frames each."""
    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    u = im2col(f32(x), mod.kernel_size, mod.stride, conv_padding(mod), mod.dilation)
    if r > 1:
        u = u.reshape(m, r, k, -1).transpose(1, 2)
    return u.reshape(m, k, -1)


def stacked_rows(d1: torch.Tensor, d2: torch.Tensor, s: int, e: int, r: int) -> torch.Tensor:
    """([delta1; delta2]) of samples ``s .. e``, (rows, 2 Cout, h, w)."""
    return torch.cat([f32(d1[s * r:e * r]), f32(d2[s * r:e * r])], 1)


def per_sample_rows(rows: torch.Tensor, m: int, r: int) -> torch.Tensor:
    """(m r, 2 Cout, h, w) -> (m, 2 Cout, r h w): a sample's positions over its frames."""
    dd = rows.reshape(m, r, rows.shape[1], -1)
    if r > 1:
        dd = dd.transpose(1, 2)
    return dd.reshape(m, rows.shape[1], -1)


def weight_backward(mod: nn.Conv2d, grad_out: torch.Tensor, x: torch.Tensor, out_channels: int,
                    groups: int = 1) -> torch.Tensor:
    """The weight gradient of a convolution with ``out_channels`` outputs for ``grad_out``."""
    w = mod.weight.detach()
    w = w if out_channels == w.shape[0] else w.new_empty((out_channels, *w.shape[1:]))
    return torch.ops.aten.convolution_backward(
        grad_out, f32(x), f32(w), None, mod.stride, conv_padding(mod), mod.dilation, False, (0, 0), groups,
        (False, True, False))[1]


def conv_bias(mod: nn.Conv2d, dd: torch.Tensor, cout: int, grads: BatchGrads | None, start: int) -> torch.Tensor:
    bias = dd.sum(2)
    if grads is not None:
        grads.add(mod.bias, bias[:, :cout], bias[:, cout:], start)
    return pair_gram(bias)


def conv_forming(form: Callable[[nn.Conv2d, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor],
                 extra_floats: Callable[[int, int, int, int], int] = lambda r, cout, k, length: 0):
    """A method that forms the per-sample weight gradients (m, 2 Cout, K) of a sub-chunk with
    ``form(mod, x_rows, stacked_rows, dd, m, r)`` and takes the products from them."""

    def run(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
        mod, x = call.module, call.x
        r, cout, k, length = conv_geometry(call, n)
        per_sample = 2 * cout * k + 4 * cout * length + extra_floats(r, cout, k, length)
        c = chunk_size(n, per_sample, env.budget)
        out = []
        for s in range(0, n, c):
            e = min(n, s + c)
            rows = stacked_rows(d1, d2, s, e, r)
            dd = per_sample_rows(rows, e - s, r)
            g = form(mod, x[s * r:e * r], rows, dd, e - s, r)  # (m, 2 Cout, K)
            res = pair_gram(g)
            if env.grads is not None:
                env.grads.add(mod.weight, g[:, :cout], g[:, cout:], s)
            if mod.bias is not None:
                res = res + conv_bias(mod, dd, cout, env.grads, s)
            out.append(res)
        return torch.cat(out)

    return run


def form_im2col(mod, x, rows, dd, m, r):
    return torch.bmm(dd, unfold(mod, x, m, r).transpose(1, 2))


def form_direct(mod, x, rows, dd, m, r):
    return direct_weight_grads(mod, x, rows, r)


def direct_weight_grads(mod: nn.Conv2d, x: torch.Tensor, rows: torch.Tensor, r: int) -> torch.Tensor:
    """(m, 2 Cout, K) per-sample weight gradients for the cotangents ``rows`` = [delta1; delta2]
    (``r`` frames per sample), one weight-only convolution backward per sample."""
    two = rows.shape[1]
    out = rows.new_empty(x.shape[0] // r, two, mod.weight[0].numel())
    for j, i in enumerate(range(0, x.shape[0], r)):
        out[j] = weight_backward(mod, rows[i:i + r], x[i:i + r], two).flatten(1)
    return out


def form_grouped(mod, x, rows, dd, m, r):
    """One grouped convolution backward: the samples side by side as groups, the frames as batch."""
    cin, two = x.shape[1], rows.shape[1]
    xg = x.reshape(m, r, cin, *x.shape[2:]).transpose(0, 1).reshape(r, m * cin, *x.shape[2:])
    dg = rows.reshape(m, r, two, *rows.shape[2:]).transpose(0, 1).reshape(r, m * two, *rows.shape[2:])
    return weight_backward(mod, dg, xg, m * two, groups=m).reshape(m, two, -1)


def conv_gram(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    """Products without forming ``G_i``: ``<G1_i, G2_i> = sum_pq (delta1_p . delta2_q)(x_p . x_q)``."""
    mod, x = call.module, call.x
    r, cout, k, length = conv_geometry(call, n)
    c = chunk_size(n, k * length + 4 * length * length + 2 * cout * length, env.budget)
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        dd = per_sample_rows(stacked_rows(d1, d2, s, e, r), e - s, r)
        u = unfold(mod, x[s * r:e * r], e - s, r)
        gram_x = torch.bmm(u.transpose(1, 2), u)  # (m, L, L)
        del u
        g1, g2 = dd[:, :cout].transpose(1, 2), dd[:, cout:].transpose(1, 2)
        res = torch.stack([(torch.bmm(a, b.transpose(1, 2)) * gram_x).sum((1, 2))
                           for a, b in ((g1, g2), (g1, g1), (g2, g2))], 1).to(F64)
        if mod.bias is not None:
            res = res + conv_bias(mod, dd, cout, env.grads, s)
        out.append(res)
    if env.grads is not None:
        conv_batch_weight(call, d1, d2, n, env.grads)
    return torch.cat(out)


def conv_batch_weight(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, grads: BatchGrads) -> None:
    """The chunk's weight gradients for both cotangents, one weight-only convolution backward."""
    mod = call.module
    r, cout = conv_geometry(call, n)[:2]
    w1, w2 = (grads.row_weights(j, r).to(f32(d1).dtype).view(-1, 1, 1, 1) for j in (0, 1))
    g = weight_backward(mod, torch.cat([f32(d1) * w1, f32(d2) * w2], 1), call.x, 2 * cout)
    grads.add_sum(mod.weight, g[:cout], g[cout:])


def conv_cost(kind: str) -> Callable[[Call, int, bool], float]:
    def cost(call: Call, n: int, want_grads: bool) -> float:
        r, cout, k, length = conv_geometry(call, n)
        forward = cout * k * length
        if kind == "gram":
            return length * length * (k + 3 * cout) + (2 * forward if want_grads else 0)
        if kind == "sketch":
            return length * (k + 4 * cout) * 4 + (2 * forward if want_grads else 0)
        return 2 * forward + k * length + 3 * cout * k

    return cost


GROUPED_MAX_WEIGHT = 2**20  # elements of [weight; weight], which the grouped backward copies per sample


def conv_grouped_applies(call: Call) -> bool:
    """CPU only (cuDNN has no fast path for thousands of tiny groups), and only where the per-sample
    weight copies the grouped call needs stay small (early layers)."""
    mod = call.module
    return (plain_conv(mod) and call.x.device.type == "cpu"
            and 2 * mod.weight.numel() <= GROUPED_MAX_WEIGHT)


# ---- linear layers --------------------------------------------------------------------------------


def plain_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def linear_rows(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int):
    """(x, d1, d2) as (n, rows per sample, features)."""
    mod = call.module
    x = f32(call.x).reshape(n, -1, mod.in_features)
    return x, f32(d1).reshape(n, -1, mod.out_features), f32(d2).reshape(n, -1, mod.out_features)


def linear_outer(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    mod = call.module
    x, d1, d2 = linear_rows(call, d1, d2, n)
    c = chunk_size(n, 2 * mod.out_features * mod.in_features, env.budget)
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        g1 = torch.bmm(d1[s:e].transpose(1, 2), x[s:e])
        g2 = torch.bmm(d2[s:e].transpose(1, 2), x[s:e])
        res = gram3(g1, g2)
        if env.grads is not None:
            env.grads.add(mod.weight, g1, g2, s)
        out.append(res + linear_bias(mod, d1[s:e], d2[s:e], env.grads, s))
    return torch.cat(out)


def linear_bias(mod: nn.Linear, d1: torch.Tensor, d2: torch.Tensor, grads: BatchGrads | None,
                start: int) -> torch.Tensor:
    if mod.bias is None:
        return torch.zeros(d1.shape[0], 3, dtype=F64, device=d1.device)
    b1, b2 = d1.sum(1), d2.sum(1)
    if grads is not None:
        grads.add(mod.bias, b1, b2, start)
    return gram3(b1, b2)


def linear_gram(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    mod = call.module
    x, d1, d2 = linear_rows(call, d1, d2, n)
    rows = x.shape[1]
    c = chunk_size(n, 4 * rows * rows, env.budget)
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        gram_x = torch.bmm(x[s:e], x[s:e].transpose(1, 2))
        res = torch.stack([(torch.bmm(a[s:e], b[s:e].transpose(1, 2)) * gram_x).sum((1, 2))
                           for a, b in ((d1, d2), (d1, d1), (d2, d2))], 1).to(F64)
        out.append(res + linear_bias(mod, d1[s:e], d2[s:e], env.grads, s))
    if env.grads is not None:
        linear_batch_weight(mod, x, d1, d2, env.grads)
    return torch.cat(out)


def linear_batch_weight(mod: nn.Linear, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                        grads: BatchGrads) -> None:
    """A linear layer's batch weight gradients from (n, rows, features) inputs and cotangents."""
    rows = x.shape[1]
    flat_x = x.reshape(-1, mod.in_features)
    w1, w2 = (grads.row_weights(j, rows).to(x.dtype).view(-1, 1) for j in (0, 1))
    grads.add_sum(mod.weight, (d1.reshape(-1, mod.out_features) * w1).T @ flat_x,
                  (d2.reshape(-1, mod.out_features) * w2).T @ flat_x)


def linear_cost(kind: str) -> Callable[[Call, int, bool], float]:
    def cost(call: Call, n: int, want_grads: bool) -> float:
        mod = call.module
        rows = call.x.numel() // (n * mod.in_features)
        forward = rows * mod.in_features * mod.out_features
        if kind == "gram":
            return rows * rows * (mod.in_features + 3 * mod.out_features) + (2 * forward if want_grads else 0)
        if kind == "sketch":
            return rows * (mod.in_features + 4 * mod.out_features) * 4 + (2 * forward if want_grads else 0)
        return 2 * forward + 3 * mod.in_features * mod.out_features

    return cost


# ---- eval-mode batch normalisation ----------------------------------------------------------------


def eval_batchnorm(mod: nn.Module) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    return (isinstance(mod, bn) and type(mod).forward is bn.forward and not mod.training
            and mod.running_mean is not None and mod.running_var is not None)


def bn_elementwise(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    mod, x = call.module, f32(call.x)
    d1, d2 = f32(d1), f32(d2)
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
        if env.grads is not None:
            env.grads.add(param, q1, q2, 0)
    return res


def bn_cost(call: Call, n: int, want_grads: bool) -> float:
    return 4 * call.x.numel() / n


# ---- any module: vmap and loop over the module alone ------------------------------------------------


def generic_applies(call: Call) -> bool:
    rows = call.output.shape[0] if call.output.dim() else 0
    return rows > 0 and any(isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows for a in call.args)


def split_args(call: Call, n: int) -> tuple[list[Any], list[int | None]]:
    """The positional inputs with the per-sample ones reshaped to (n, rows per sample, ...), and
    their vmap dimensions (None: shared by every sample)."""
    rows = call.output.shape[0]
    args, dims = [], []
    for a in call.args:
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows:
            args.append(f32(a).reshape(n, rows // n, *a.shape[1:]))
            dims.append(0)
        else:
            args.append(f32(a) if isinstance(a, torch.Tensor) else a)
            dims.append(None)
    return args, dims


def own_names(call: Call) -> list[str]:
    ids = {id(p) for p in call.params}
    return [name for name, p in call.module.named_parameters(recurse=False) if id(p) in ids]


def generic_products(call: Call, grads1: list[torch.Tensor], grads2: list[torch.Tensor], start: int,
                     env: Env) -> torch.Tensor:
    """Products of per-sample gradients (m, ...) listed per parameter; the batch gradients too."""
    res = None
    for p, g1, g2 in zip(call.params, grads1, grads2):
        g1, g2 = f32(g1), f32(g2)
        part = gram3(g1, g2)
        res = part if res is None else res + part
        if env.grads is not None:
            env.grads.add(p, g1, g2, start)
    return res


def generic_vmap(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    mod = call.module
    names = own_names(call)
    params = {name: p.detach() for name, p in zip(names, call.params)}
    args, dims = split_args(call, n)
    rows = call.output.shape[0] // n
    dd1 = f32(d1).reshape(n, rows, *d1.shape[1:])
    dd2 = f32(d2).reshape(n, rows, *d2.shape[1:])

    def one(p, u, w, *xs):
        _, pull = torch.func.vjp(lambda q: torch.func.functional_call(mod, q, xs, call.kwargs), p)
        g1, g2 = pull(u)[0], pull(w)[0]
        return [g1[k] for k in names], [g2[k] for k in names]

    batched = torch.func.vmap(one, in_dims=(None, 0, 0, *dims))
    n_params = sum(p.numel() for p in call.params)
    c = chunk_size(n, 3 * n_params + 4 * call.output[0].numel() * rows, env.budget)
    out = []
    for s in range(0, n, c):
        e = min(n, s + c)
        xs = [a[s:e] if dim == 0 else a for a, dim in zip(args, dims)]
        g1, g2 = batched(params, dd1[s:e], dd2[s:e], *xs)
        out.append(generic_products(call, g1, g2, s, env))
    return torch.cat(out)


def generic_loop(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    mod = call.module
    rows = call.output.shape[0] // n
    args = [f32(a) if isinstance(a, torch.Tensor) else a for a in call.args]
    per_sample = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == call.output.shape[0] for a in args]
    d1, d2 = f32(d1), f32(d2)
    out = []
    with torch.enable_grad():
        for i in range(n):
            xs = [a[i * rows:(i + 1) * rows] if split else a for a, split in zip(args, per_sample)]
            y = mod(*xs, **call.kwargs)
            g1 = torch.autograd.grad(y, call.params, d1[i * rows:(i + 1) * rows], retain_graph=True,
                                     allow_unused=True)
            g2 = torch.autograd.grad(y, call.params, d2[i * rows:(i + 1) * rows], allow_unused=True)
            g1 = [torch.zeros_like(p) if g is None else g for g, p in zip(g1, call.params)]
            g2 = [torch.zeros_like(p) if g is None else g for g, p in zip(g2, call.params)]
            out.append(generic_products(call, [g.unsqueeze(0) for g in g1], [g.unsqueeze(0) for g in g2], i, env))
    return torch.cat(out)


def generic_cost(factor: float) -> Callable[[Call, int, bool], float]:
    def cost(call: Call, n: int, want_grads: bool) -> float:
        return factor * (3 * sum(p.numel() for p in call.params) + call.output.numel() / n)

    return cost


def always(call: Call) -> bool:
    return True


def _sketch_run(call: Call, d1: torch.Tensor, d2: torch.Tensor, n: int, env: Env) -> torch.Tensor:
    return env.sketch.products(call, d1, d2, n, env)


def conv_im2col_applies(call: Call) -> bool:
    return plain_conv(call.module)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("im2col", conv_im2col_applies, conv_cost("im2col"),
           conv_forming(form_im2col, lambda r, cout, k, length: k * length)),
    Method("direct", conv_im2col_applies, conv_cost("direct"), conv_forming(form_direct)),
    Method("grouped", conv_grouped_applies, conv_cost("grouped"),
           conv_forming(form_grouped, lambda r, cout, k, length: 2 * cout * k)),
    Method("gram", lambda c: plain_conv(c.module) or plain_linear(c.module),
           lambda c, n, g: (conv_cost if plain_conv(c.module) else linear_cost)("gram")(c, n, g),
           lambda c, a, b, n, env: (conv_gram if plain_conv(c.module) else linear_gram)(c, a, b, n, env)),
    Method("outer", lambda c: plain_linear(c.module), linear_cost("outer"), linear_outer),
    Method("elementwise", lambda c: eval_batchnorm(c.module), bn_cost, bn_elementwise),
    Method("vmap", generic_applies, generic_cost(1.0), generic_vmap),
    Method("loop", generic_applies, generic_cost(2.0), generic_loop),
    Method("sketch", lambda c: plain_conv(c.module) or plain_linear(c.module),
           lambda c, n, g: (conv_cost if plain_conv(c.module) else linear_cost)("sketch")(c, n, g),
           _sketch_run, exact=False),
)}
EXACT_METHODS = tuple(name for name, m in METHODS.items() if m.exact)

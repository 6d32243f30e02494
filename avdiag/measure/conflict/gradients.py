"""Shared machinery of the conflict measure: which parameters make up an encoder, the model state
saved and restored around a measurement, and the pass through the head that gives the losses and
their gradients at the pooled features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.measure.conflict.products import F64, f32, stats3
from avdiag.models.parts import AVParts, FeatureFn

MODALITIES = ("audio", "visual")


@dataclass
class Encoder:
    """Encoder ``m``'s parameters, grouped by owning module for the per-layer breakdown."""

    modality: str
    module: nn.Module
    names: list[str]  # parameter names relative to the encoder
    params: list[nn.Parameter]
    owners: list[int]  # parameter -> index into layers
    layers: list[str]  # qualified module names (in the model)
    modules: list[nn.Module]  # the module of each layer
    shares_parameters: bool = False  # a parameter owned by more than one module (hooks engine: no)
    feature_fn: FeatureFn | None = None  # (encoder, input) -> pooled features; None: the built-in pooling


def _qualified_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name + "." if name else ""
    return ""


def encoder_info(model: nn.Module, modality: str, enc: nn.Module, feature_fn: FeatureFn | None = None) -> Encoder:
    """The parameters of ``enc`` in module order, each owned by the first module that holds it."""
    prefix = _qualified_prefix(model, enc)
    names, params, owners, layers, modules = [], [], [], [], []
    seen: set[int] = set()
    shares = False
    for mod_name, mod in enc.named_modules(remove_duplicate=False):
        direct = list(mod.named_parameters(recurse=False))
        own = [(n, p) for n, p in direct if id(p) not in seen]
        shares = shares or len(own) < len(direct)
        if not own:
            continue
        layers.append(prefix + mod_name if mod_name else prefix.rstrip(".") or modality)
        modules.append(mod)
        for n, p in own:
            seen.add(id(p))
            names.append(f"{mod_name}.{n}" if mod_name else n)
            params.append(p)
            owners.append(len(layers) - 1)
    return Encoder(modality, enc, names, params, owners, layers, modules, shares, feature_fn)


class ModelState:
    """Saves train/eval flags, buffers (``save_buffers``) and requires_grad flags; switches every
    parameter's requires_grad on inside the ``with`` block and restores everything on exit."""

    def __init__(self, model: nn.Module, save_buffers: bool):
        self.model = model
        self.training = [(m, m.training) for m in model.modules()]
        self.requires = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = list(model.buffers()) if save_buffers else []
        self.saved = [torch.empty_like(b) for b in self.buffers]
        copy_tensors(self.saved, self.buffers)

    def __enter__(self) -> "ModelState":
        for p, _ in self.requires:
            p.requires_grad_(True)
        return self

    def reset_buffers(self) -> None:
        """Undo what a train-mode forward did to the buffers (BatchNorm running statistics)."""
        copy_tensors(self.buffers, self.saved)

    def __exit__(self, *exc) -> None:
        self.reset_buffers()
        for p, flag in self.requires:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


@torch.no_grad()
def copy_tensors(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every pair: one multi-tensor kernel per dtype and device rather than
    one per tensor (a ResNet pair has ~120 buffers; a launch-bound GPU pass pays for each kernel)."""
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dst, src, strict=True):
        pair = groups.setdefault((d.dtype, d.device), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    foreach_copy = getattr(torch, "_foreach_copy_", None)  # PyTorch 2.2 and later
    for ds, ss in groups.values():
        if foreach_copy is not None:
            foreach_copy(ds, ss)
        else:
            for d, s in zip(ds, ss):
                d.copy_(s)


@dataclass
class HeadPass:
    losses: dict[str, float]  # "multimodal", "audio", "visual" (means over the samples passed)
    cot_mm: dict[str, torch.Tensor]  # dCE(fused)/d feature m  (B, d_m), mean loss
    cot_uni: dict[str, torch.Tensor]  # dCE(uni m)/d feature m
    head_grads: tuple[list[torch.Tensor], list[torch.Tensor]] | None  # the two uni-modal losses' gradients
    # on the shared head elements (one flat tensor per masked head tensor); None without masks


def head_pass(parts: AVParts, feats: dict[str, torch.Tensor], y: torch.Tensor,
              head_params: list[nn.Parameter], masks: list[torch.Tensor | None] | None) -> HeadPass:
    """Losses and their gradients at the pooled features (and, with ``masks``, the gradients of the
    two uni-modal losses on the shared head elements), on a graph of the head alone: the features
    are detached leaves."""
    a = f32(feats["audio"].detach()).requires_grad_(True)
    v = f32(feats["visual"].detach()).requires_grad_(True)
    fused = parts.fuse(a, v)
    uni = parts.unimodal(a, v)
    l_mm = F.cross_entropy(fused, y)
    l_uni = {m: F.cross_entropy(uni[m], y) for m in MODALITIES}
    cot_mm = dict(zip(MODALITIES, torch.autograd.grad(l_mm, [a, v], allow_unused=True, retain_graph=True)))
    hp = head_params if masks is not None else []
    ga = torch.autograd.grad(l_uni["audio"], [a] + hp, allow_unused=True, retain_graph=True)
    gv = torch.autograd.grad(l_uni["visual"], [v] + hp, allow_unused=True)
    leaves = {"audio": a, "visual": v}
    cot_uni = {"audio": ga[0], "visual": gv[0]}
    for d in (cot_mm, cot_uni):
        for m in MODALITIES:
            if d[m] is None:
                d[m] = torch.zeros_like(leaves[m])
    head_grads = None
    if masks is not None and any(mk is not None for mk in masks):
        head_grads = ([], [])
        for gx, gy, mk, p in zip(ga[1:], gv[1:], masks, hp):
            if mk is not None:
                head_grads[0].append((torch.zeros_like(p) if gx is None else gx)[mk])
                head_grads[1].append((torch.zeros_like(p) if gy is None else gy)[mk])
    losses = {"multimodal": l_mm.detach(), **{m: l.detach() for m, l in l_uni.items()}}
    return HeadPass({k: float(v) for k, v in losses.items()}, cot_mm, cot_uni, head_grads)


def head_products(head_grads: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple[float, float, float]:
    """<g_a, g_v>, |g_a|^2, |g_v|^2 over the shared head elements."""
    gx, gy = head_grads
    return tuple(tensor_products(gx, gy, gx).sum(0).tolist())


def shared_masks(parts: AVParts, head_params: list[nn.Parameter], feats: dict[str, torch.Tensor]
                 ) -> list[torch.Tensor | None]:
    """Per head tensor, the elements both uni-modal logits depend on (None: no such element),
    probed with random features and random output weights at the current parameter values."""
    if not head_params:
        return []
    g = torch.Generator().manual_seed(0)
    probe = {m: torch.randn(4, feats[m].shape[1], generator=g).to(feats[m]) for m in MODALITIES}
    out = parts.unimodal(probe["audio"], probe["visual"])
    grads = {}
    for m in MODALITIES:
        w = torch.randn(out[m].shape, generator=g).to(out[m])
        grads[m] = torch.autograd.grad((out[m] * w).sum(), head_params, allow_unused=True, retain_graph=True)
    masks: list[torch.Tensor | None] = []
    for ga, gv in zip(grads["audio"], grads["visual"]):
        mk = None if ga is None or gv is None else (ga != 0) & (gv != 0)
        masks.append(mk if mk is not None and bool(mk.any()) else None)
    return masks


# Mean elements per tensor up to which the CPU takes every tensor's products in one batched float64
# pass rather than tensor by tensor (ResNet encoders, 2 cores: 0.9 vs 4.7 ms at 740 elements a tensor,
# 3.9 vs 5.0 ms at 2,900, 15 vs 5.9 ms at 11,700). On a GPU the batched pass always wins: tensor by
# tensor is ~30 small kernels a tensor, and a launch-bound pass pays for each.
CPU_BATCHED_MAX_MEAN = 2048
PRODUCTS = "auto"  # "auto" (the rule above), or "batched" / "per-tensor" everywhere (tests, benchmarks)


def tensor_products(g1: Sequence[torch.Tensor | None], g2: Sequence[torch.Tensor | None],
                    params: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n_tensors, 3) float64: <g1, g2>, |g1|^2, |g2|^2 per parameter tensor (a missing gradient is zero)."""
    a = [torch.zeros_like(p) if x is None else x for x, p in zip(g1, params)]
    b = [torch.zeros_like(p) if x is None else x for x, p in zip(g2, params)]
    if not a:
        return torch.zeros(0, 3, dtype=F64)
    if _batched(a):
        return batched_products(a, b)
    return torch.stack([stats3(x, y) for x, y in zip(a, b)])


def _batched(tensors: Sequence[torch.Tensor]) -> bool:
    if PRODUCTS != "auto":
        return PRODUCTS == "batched"
    total = sum(t.numel() for t in tensors)
    return tensors[0].device.type != "cpu" or total <= CPU_BATCHED_MAX_MEAN * len(tensors)


def batched_products(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`tensor_products` of equal-shaped tensor pairs in a few kernels: the tensors concatenated
    and widened to float64 (where the squares of float32 values cannot underflow), then one segmented
    sum per figure, each product formed only when it is summed (peak: three float64 copies of the
    gradients). ``unsafe``: the lengths are right by construction, and checking them reads them back to
    the host (a synchronisation per call on a GPU)."""
    lengths = _segment_lengths(tuple(t.numel() for t in a), a[0].device)
    flat_a = torch.cat([t.reshape(-1) for t in a]).to(F64)
    flat_b = torch.cat([t.reshape(-1) for t in b]).to(F64)
    sums = [torch.segment_reduce(x * y, "sum", lengths=lengths, unsafe=True)
            for x, y in ((flat_a, flat_b), (flat_a, flat_a), (flat_b, flat_b))]
    return torch.stack(sums, 1)


_LENGTHS: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _segment_lengths(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The segment lengths on ``device``, copied there once per parameter list (not once per call)."""
    key = (sizes, device)
    if key not in _LENGTHS:
        if len(_LENGTHS) > 64:
            _LENGTHS.clear()
        _LENGTHS[key] = torch.tensor(sizes, dtype=torch.long, device=device)
    return _LENGTHS[key]

"""ABRi: Adaptive BatchNorm Re-initialization (Feng, Xia, Hu 2023, "Revisiting Pre-training in
Audio-Visual Learning").

When an encoder pre-trained on one modality initialises another, many BatchNorm channels carry
abnormal affine parameters (|gamma| and |beta| tiny, or beta strongly negative) and are dead after
the ReLU. ABRi gives every BatchNorm2d a parallel, freshly initialised BN on the same input and
blends the two with a learnable, unconstrained ``alpha`` (initialised to 0.5; one scalar per layer
or one per channel)::

    y = alpha * BN_orig(x) + (1 - alpha) * BN_new(x)

The pair stays in place for the whole fine-tuning: it is a re-parametrisation, not a one-off reset.

Three pieces live here:

* **Fold math** (pure functions on tensors, for rewriting checkpoints without changing the
  architecture): :func:`fold_init`, :func:`blend_running_stats`, :func:`reset_running_stats`.
  In training mode both branches normalise with the same batch statistics, so at initialisation
  the pair equals one BN with ``gamma' = a*gamma + (1-a)*1`` and ``beta' = a*beta``; a dead
  channel (gamma ~ 0) gets ``gamma' ~ 1 - a = 0.5``.
* **Module mode**: :class:`ABRiBatchNorm2d` and :func:`convert`. The converted module *is* the
  original BN (its ``weight``, ``bias``, ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` are the pretrained branch, so the original checkpoint keys keep their
  meaning) plus these extra state-dict keys per converted layer ``<bn>``::

      <bn>.abri_alpha                                  () per layer, or (C,) per channel
      <bn>.abri_new.weight, <bn>.abri_new.bias          the fresh branch's gamma, beta
      <bn>.abri_new.running_mean, <bn>.abri_new.running_var, <bn>.abri_new.num_batches_tracked

  A module-mode checkpoint loads with ``convert(build_model()).load_state_dict(sd, strict=True)``.
* **Merge back**: :func:`merge` folds every ABRi pair into a plain ``nn.BatchNorm2d`` whose
  eval-mode output equals the pair's eval-mode output (the paper publishes no merge; the running
  statistics of the merged layer are re-estimated on data when data is given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from avdiag.locate.resolve import out_of_memory_as_error
from avdiag.measure.moments import RunningMoments
from avdiag.measure.precision import full_fp32

__all__ = [
    "ABRiBatchNorm2d",
    "MergeReport",
    "abri_modules",
    "abri_parameters",
    "blend_running_stats",
    "convert",
    "fold_init",
    "merge",
    "reset_running_stats",
    "reviving_alpha",
]

Channels = torch.Tensor | Sequence[int] | None


# --- fold math -------------------------------------------------------------------------------------


def _channel_index(channels: Channels, n: int, device: torch.device) -> torch.Tensor | None:
    """``channels`` as a LongTensor of indices into ``n`` channels (None: all channels).

    Accepts a LongTensor / list / tuple of indices (negative indices count from the end) or a
    boolean mask of length ``n``.
    """
    if channels is None:
        return None
    idx = torch.as_tensor(channels, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"a channel mask must have shape ({n},), got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    if idx.numel() == 0:
        return idx.reshape(0).long()
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"channel indices must be integers or a boolean mask, got {idx.dtype}")
    idx = idx.reshape(-1).long()
    if int(idx.min()) < -n or int(idx.max()) >= n:
        raise IndexError(f"channel index out of range for {n} channels")
    return idx % n


def _alpha64(alpha: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """alpha as a float64 tensor of shape () or (n,)."""
    a = (alpha.detach() if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha), dtype=torch.float64))
    a = a.to(device=device, dtype=torch.float64)
    if a.dim() == 0 or a.shape == (n,):
        return a
    if a.numel() == 1:
        return a.reshape(())
    raise ValueError(f"alpha must be a scalar or have shape ({n},), got {tuple(a.shape)}")


def _blend_towards(x: torch.Tensor, target: float, alpha: float | torch.Tensor | None,
                   channels: Channels) -> torch.Tensor:
    """``a*x + (1-a)*target`` (``alpha=None``: just ``target``) on ``channels``, elsewhere ``x``.

    Computed in float64 and returned in ``x``'s dtype as a new tensor; ``x`` is not modified.
    """
    if x.dim() != 1:
        raise ValueError(f"expected a 1-D per-channel tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    x64 = x.detach().to(torch.float64)
    if alpha is None:
        blended = torch.full_like(x64, target)
    else:
        a = _alpha64(alpha, n, x.device)
        blended = a * x64 + (1 - a) * target
    idx = _channel_index(channels, n, x.device)
    if idx is None:
        out = blended
    else:
        out = x64.clone()
        out[idx] = blended[idx]
    return out.to(x.dtype)


def fold_init(gamma: torch.Tensor, beta: torch.Tensor, alpha: float | torch.Tensor = 0.5,
              channels: Channels = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ABRi blend at initialisation folded into one BN's affine parameters (Feng, Xia, Hu 2023).

    In training mode the pretrained branch (``gamma``, ``beta``) and the fresh branch (1, 0)
    normalise with the same batch statistics, so ``alpha*BN_orig + (1-alpha)*BN_new`` equals one
    BN with::

        gamma' = alpha * gamma + (1 - alpha) * 1
        beta'  = alpha * beta

    ``alpha``: a float, a 0-d tensor or a per-channel ``(C,)`` tensor. ``channels``: indices
    (LongTensor or list) or a boolean mask; only those channels change. Returns new tensors in the
    input dtype (computed in float64); the inputs are untouched.
    """
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma and beta shapes differ: {tuple(gamma.shape)} vs {tuple(beta.shape)}")
    return _blend_towards(gamma, 1.0, alpha, channels), _blend_towards(beta, 0.0, alpha, channels)


def blend_running_stats(mean: torch.Tensor, var: torch.Tensor, alpha: float | torch.Tensor = 0.5,
                        channels: Channels = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend running statistics towards a fresh BN's (mean 0, var 1): ``(a*mean, a*var + (1-a))``.

    The running statistics of the two ABRi branches (Feng, Xia, Hu 2023) differ, so no single pair
    reproduces the blend in eval mode; this linear blend is the fold-mode approximation. Same
    ``alpha``/``channels`` conventions and return types as :func:`fold_init`.
    """
    if mean.shape != var.shape:
        raise ValueError(f"mean and var shapes differ: {tuple(mean.shape)} vs {tuple(var.shape)}")
    return _blend_towards(mean, 0.0, alpha, channels), _blend_towards(var, 1.0, alpha, channels)


def reset_running_stats(mean: torch.Tensor, var: torch.Tensor,
                        channels: Channels = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh BN's running statistics (mean 0, var 1) on ``channels`` (all when None), as the
    reset baselines of Feng, Xia, Hu 2023 do. Returns new tensors; the inputs are untouched."""
    if mean.shape != var.shape:
        raise ValueError(f"mean and var shapes differ: {tuple(mean.shape)} vs {tuple(var.shape)}")
    return _blend_towards(mean, 0.0, None, channels), _blend_towards(var, 1.0, None, channels)


_ALPHA_STEPS = 400  # resolution of the search for a reviving alpha: alpha / 400


def reviving_alpha(gamma: torch.Tensor, beta: torch.Tensor, var: torch.Tensor, eps: float,
                   alpha: float = 0.5, stats: str = "blend", channels: Channels = None, *, dead_z: float = -3.0,
                   revive_z: float = -1.0, constant_scale: float = 1e-3) -> torch.Tensor:
    """Per channel, the alpha of the fold blend that leaves the channel alive: ``alpha`` itself where the
    blend already does, else the largest alpha in [0, ``alpha``] whose folded channel reaches
    ``z >= revive_z`` (avdiag's rule: the least extra move towards the fresh BN that revives the channel
    with a margin). Returns a float64 ``(C,)`` tensor.

    A folded channel is dead as the static scan counts it (:mod:`avdiag.measure.static`): with
    ``s = |gamma'| * sqrt(var' / (var' + eps))``, ``z = beta' / s < dead_z``, or ``s < constant_scale``
    with ``beta' <= constant_scale``. ``var'`` follows the running statistics of the fold: ``blend``
    (``a*var + (1-a)``), ``reset`` (1) or ``given`` (``var`` as it is: statistics re-estimated on data).
    At alpha 0 the channel is a fresh BN (gamma 1, beta 0, z 0), so a reviving alpha exists unless
    ``var`` itself is ~0 under ``given`` statistics (an input channel that never varies); such a channel
    keeps ``alpha``. Channels outside ``channels`` and non-finite ones keep ``alpha``.
    """
    n = gamma.shape[0]
    grid = torch.linspace(float(alpha), 0.0, _ALPHA_STEPS + 1, dtype=torch.float64).unsqueeze(1)  # (G, 1)
    z, scale, folded_beta = _folded_z(gamma, beta, var, eps, grid, stats)
    constant_zero = (scale < constant_scale) & (folded_beta <= constant_scale)
    alive = (z >= revive_z) & ~constant_zero
    finite = torch.stack([torch.isfinite(t.detach().double().cpu()) for t in (gamma, beta, var)]).all(dim=0)
    revive = ((z[0] < dead_z) | constant_zero[0]) & finite & alive.any(dim=0)
    first_alive = alive.to(torch.int8).argmax(dim=0)  # the largest alive alpha: the grid runs downwards
    chosen = torch.where(revive, grid[first_alive, 0], torch.full((n,), float(alpha), dtype=torch.float64))
    idx = _channel_index(channels, n, torch.device("cpu"))
    if idx is None:
        return chosen
    out = torch.full((n,), float(alpha), dtype=torch.float64)
    out[idx] = chosen[idx]
    return out


def _folded_z(gamma: torch.Tensor, beta: torch.Tensor, var: torch.Tensor, eps: float, a: torch.Tensor,
              stats: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, s, beta') of the folded channels for every alpha in ``a`` ((G, 1)): (G, C) each."""
    g, b, v = (t.detach().to(torch.float64).cpu() for t in (gamma, beta, var))
    folded_gamma, folded_beta = a * g + (1 - a), a * b
    if stats == "blend":
        folded_var = a * v + (1 - a)
    elif stats == "reset":
        folded_var = torch.ones_like(folded_gamma)
    else:
        folded_var = v.expand_as(folded_gamma)
    scale = folded_gamma.abs() * torch.sqrt(folded_var / (folded_var + eps))
    signed_inf = torch.where(folded_beta > 0, float("inf"), float("-inf"))  # s == 0: the sign of beta' decides
    z = torch.where(scale > 0, folded_beta / scale.clamp_min(1e-300), signed_inf)
    return z, scale, folded_beta


# --- module mode -----------------------------------------------------------------------------------


class ABRiBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d re-parametrised by ABRi (Feng, Xia, Hu 2023, "Revisiting Pre-training in
    Audio-Visual Learning")::

        y = alpha * BN_orig(x) + (1 - alpha) * BN_new(x)

    This module *is* ``BN_orig``: its own ``weight``, ``bias``, ``running_mean``, ``running_var``
    and ``num_batches_tracked`` are the pretrained branch, under the original state-dict keys.
    ``abri_new`` is the fresh branch (an ``nn.BatchNorm2d`` with gamma 1, beta 0, mean 0, var 1,
    the same eps/momentum/affine/track_running_stats) and ``abri_alpha`` the learnable, unconstrained
    blend weight: shape ``()`` per layer or ``(C,)`` per channel, initialised to ``alpha``.

    Both branches run in this module's current mode. Training: both normalise with the batch
    statistics and each updates its own running statistics. Eval: each uses its own running
    statistics. Use :func:`merge` to fold the pair back into a plain ``nn.BatchNorm2d``.

    ``abri_alpha`` is an ordinary parameter: exclude it from weight decay (see
    :func:`abri_parameters`) unless a pull towards the new branch is wanted.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 alpha: float = 0.5, per_channel: bool = False):
        if not affine:
            raise ValueError("ABRi blends affine parameters; a BatchNorm2d with affine=False has none")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.abri_new = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats,
                                       device=device, dtype=dtype)
        shape = (num_features,) if per_channel else ()
        self.abri_alpha = nn.Parameter(torch.full(shape, float(alpha), device=device,
                                                  dtype=dtype if dtype is not None else torch.get_default_dtype()))

    @property
    def per_channel(self) -> bool:
        return self.abri_alpha.dim() == 1

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, alpha: float = 0.5, per_channel: bool = False) -> ABRiBatchNorm2d:
        """An ABRi module whose pretrained branch is a copy of ``bn`` (parameters, running statistics,
        ``num_batches_tracked``, ``requires_grad`` flags and train/eval mode); ``bn`` is untouched."""
        if not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, ABRiBatchNorm2d):
            raise TypeError(f"expected a plain nn.BatchNorm2d, got {type(bn).__name__}")
        ref = bn.weight if bn.weight is not None else bn.running_mean
        kwargs = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        module = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs,
                     alpha=alpha, per_channel=per_channel)
        with torch.no_grad():
            module.weight.copy_(bn.weight)
            module.bias.copy_(bn.bias)
            if bn.track_running_stats:
                module.running_mean.copy_(bn.running_mean)
                module.running_var.copy_(bn.running_var)
                module.num_batches_tracked.copy_(bn.num_batches_tracked)
        module.weight.requires_grad_(bn.weight.requires_grad)
        module.bias.requires_grad_(bn.bias.requires_grad)
        module.train(bn.training)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.abri_new.train(self.training)  # the fresh branch always runs in this module's mode
        y_orig = super().forward(x)
        y_new = self.abri_new(x)
        a = self.abri_alpha.view(1, -1, 1, 1) if self.per_channel else self.abri_alpha
        return a * y_orig + (1 - a) * y_new

    @torch.no_grad()
    def effective_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma_eff, beta_eff) of the one BN the pair equals in training mode (float64):
        ``alpha*gamma_orig + (1-alpha)*gamma_new``, ``beta`` likewise."""
        a = self.abri_alpha.double()
        return (a * self.weight.double() + (1 - a) * self.abri_new.weight.double(),
                a * self.bias.double() + (1 - a) * self.abri_new.bias.double())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", abri_alpha={'per-channel' if self.per_channel else 'per-layer'}"


def abri_modules(model: nn.Module) -> list[tuple[str, ABRiBatchNorm2d]]:
    """The (qualified name, module) pairs of every ABRi layer in ``model`` (each module once)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ABRiBatchNorm2d)]


def abri_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every ``abri_alpha`` of ``model``: handy for an optimizer group without weight decay."""
    return [m.abri_alpha for _, m in abri_modules(model)]


def _replace(model: nn.Module, new_modules: dict[int, nn.Module]) -> nn.Module:
    """Swap every child whose id is in ``new_modules`` (at every place it is registered, so a
    module shared between parents is replaced everywhere); the root itself too."""
    if id(model) in new_modules:
        return new_modules[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_modules:
                setattr(parent, child_name, new_modules[id(child)])
    return model


def convert(model: nn.Module, alpha: float = 0.5, per_channel: bool = False,
            include: Callable[[str], bool] | None = None) -> nn.Module:
    """Apply ABRi (Feng, Xia, Hu 2023) to ``model`` in place: every plain ``nn.BatchNorm2d`` (or
    those whose qualified name ``include(name)`` accepts) becomes an :class:`ABRiBatchNorm2d`
    whose pretrained branch is the original layer.

    BatchNorm2d layers with ``affine=False`` (nothing to re-initialise) and layers already
    converted, with their ``abri_new`` branches, are left alone. Returns the model (a new module
    only when ``model`` itself is a BatchNorm2d). The converted state dict has the original keys
    plus, per converted layer, ``<bn>.abri_alpha`` and ``<bn>.abri_new.{weight, bias,
    running_mean, running_var, num_batches_tracked}``.
    """
    converted: dict[int, nn.Module] = {}
    inside_abri: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside_abri):
            continue
        if isinstance(module, ABRiBatchNorm2d):
            inside_abri.append(name + "." if name else "")
            continue
        if not isinstance(module, nn.BatchNorm2d) or not module.affine:
            continue
        if include is not None and not include(name):
            continue
        converted[id(module)] = ABRiBatchNorm2d.from_bn(module, alpha=alpha, per_channel=per_channel)
    return _replace(model, converted)


# --- merge back ------------------------------------------------------------------------------------


@dataclass
class MergeReport:
    """What :func:`merge` did.

    ``stats``: where the merged layers' running statistics come from: ``"data"`` (re-estimated
    from the inputs seen over the loader), ``"pretrained"`` (the pretrained branch's), ``"mixed"``
    (data given, but some layers were never reached and kept the pretrained statistics; they are
    listed in ``unreached``), ``"batch"`` (no merged layer tracks running statistics). ``layers``
    gives the source per layer (``"batch"`` for a layer without running statistics, exact in both
    modes). ``alpha_mean``: each layer's mean alpha at
    merge time (1 = all pretrained branch, 0 = all fresh branch).
    """

    stats: str
    layers: dict[str, str] = field(default_factory=dict)
    alpha_mean: dict[str, float] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)  # input positions (batch x spatial) seen per layer
    batches: int = 0
    unreached: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stats": self.stats, "layers": dict(self.layers), "alpha_mean": dict(self.alpha_mean),
                "positions": dict(self.positions), "batches": self.batches, "unreached": list(self.unreached)}


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives; CPU for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def batch_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside dicts, lists and tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(batch_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` with the batch's tensors moved to the model's device first."""
    return model(batch_to(batch, model_device(model)))


def _collect_input_stats(model: nn.Module, layers: list[tuple[str, ABRiBatchNorm2d]], loader: Iterable,
                         forward: Callable[[nn.Module, Any], Any],
                         tf32: bool = False) -> tuple[dict[int, RunningMoments], int]:
    """Run ``forward(model, batch)`` over ``loader`` in eval mode without gradients (full float32
    unless ``tf32``), recording the input of every ABRi layer; every module's train/eval flag is
    restored afterwards."""
    moments = {id(m): RunningMoments() for _, m in layers}
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(lambda _m, args, acc=moments[id(m)]: acc.add(args[0]))
               for _, m in layers]
    n_batches = 0
    device = model_device(model)
    try:
        model.eval()
        with torch.no_grad(), full_fp32(device, enabled=not tf32), out_of_memory_as_error():
            for batch in loader:
                forward(model, batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return moments, n_batches


@torch.no_grad()
def _merged_bn(module: ABRiBatchNorm2d, stats: tuple[torch.Tensor, torch.Tensor] | None) -> nn.BatchNorm2d:
    """A plain BN whose eval output equals ``module``'s eval output.

    Per channel the eval-mode pair is affine in x, ``y = A x + B`` with (si = sqrt(vi + eps))::

        A = a*g1/s1 + (1-a)*g2/s2
        B = a*(b1 - g1*m1/s1) + (1-a)*(b2 - g2*m2/s2)

    and for any running statistics (m, v) the BN with gamma = A*sqrt(v + eps), beta = B + A*m
    gives the same line. (m, v) = ``stats`` when given, else the pretrained branch's. Without
    running statistics both modes use batch statistics and the pair is exactly the BN with
    (gamma_eff, beta_eff). Computed in float64.
    """
    ref = module.weight
    bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, True, module.track_running_stats,
                        device=ref.device, dtype=ref.dtype)
    a = module.abri_alpha.detach().double()
    g1, b1 = module.weight.double(), module.bias.double()
    g2, b2 = module.abri_new.weight.double(), module.abri_new.bias.double()
    if not module.track_running_stats:
        gamma, beta = a * g1 + (1 - a) * g2, a * b1 + (1 - a) * b2
    else:
        new = module.abri_new
        s1 = (module.running_var.double() + module.eps).sqrt()
        s2 = (new.running_var.double() + module.eps).sqrt()
        slope = a * g1 / s1 + (1 - a) * g2 / s2
        m1, m2 = module.running_mean.double(), new.running_mean.double()
        offset = a * (b1 - g1 * m1 / s1) + (1 - a) * (b2 - g2 * m2 / s2)
        if stats is None:
            mean, var = module.running_mean.double(), module.running_var.double()
        else:
            mean, var = (s.to(device=ref.device, dtype=torch.float64) for s in stats)
        gamma = slope * (var + module.eps).sqrt()
        beta = offset + slope * mean
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.copy_(module.num_batches_tracked)
    bn.weight.copy_(gamma)
    bn.bias.copy_(beta)
    bn.weight.requires_grad_(module.weight.requires_grad)
    bn.bias.requires_grad_(module.bias.requires_grad)
    bn.train(module.training)
    return bn


def merge(model: nn.Module, loader: Iterable | None = None, forward: Callable[[nn.Module, Any], Any] | None = None,
          *, tf32: bool = False) -> tuple[nn.Module, MergeReport]:
    """Fold every :class:`ABRiBatchNorm2d` of ``model`` back into a plain ``nn.BatchNorm2d``, in place.

    Feng, Xia, Hu 2023 ("Revisiting Pre-training in Audio-Visual Learning") publish no merge; this
    one is exact in eval mode: the merged layer's eval output equals the pair's eval output (up to
    float rounding), whatever running statistics it is given. Which statistics:

    * ``loader`` given: the per-channel mean and population variance of each ABRi layer's *input*,
      exact over every batch of ``loader``, run in eval mode through ``forward(model, batch)``
      (default ``model(batch)`` with the batch's tensors moved to the model's device; full float32
      on CUDA unless ``tf32``). Training-mode batch statistics then match the running ones, so
      the merged layer behaves like the pair's eval output when fine-tuning resumes. A layer the
      loader never reaches keeps the pretrained branch's statistics (``report.unreached``).
    * no ``loader``: the pretrained branch's running statistics.

    The merged layers keep the pretrained branch's ``num_batches_tracked``, ``requires_grad`` flags
    and train/eval mode, so the merged model has exactly the original architecture's state-dict
    keys. Returns ``(model, report)``; ``model`` is a new module only when it was itself an ABRi layer.
    """
    if loader is None and forward is not None:
        raise ValueError("forward is given without a loader")
    layers = abri_modules(model)
    moments: dict[int, RunningMoments] = {}
    n_batches = 0
    if loader is not None:
        moments, n_batches = _collect_input_stats(model, layers, loader,
                                                  forward if forward is not None else default_forward, tf32)
    report = MergeReport(stats="pretrained" if loader is None else "data", batches=n_batches)
    merged: dict[int, nn.Module] = {}
    for name, module in layers:
        acc = moments.get(id(module))
        if not module.track_running_stats:
            source, stats = "batch", None
        elif acc is not None and acc.n > 0:
            source, stats = "data", (acc.mean, acc.variance)
        else:
            source, stats = "pretrained", None
            if loader is not None:
                report.unreached.append(name)
        report.layers[name] = source
        report.alpha_mean[name] = float(module.abri_alpha.detach().double().mean())
        report.positions[name] = acc.n if acc is not None else 0
        merged[id(module)] = _merged_bn(module, stats)
    if report.unreached:
        report.stats = "mixed"
    elif layers and set(report.layers.values()) == {"batch"}:
        report.stats = "batch"
    return _replace(model, merged), report


def effective_affine(gamma: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor, new_gamma: torch.Tensor,
                     new_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-mode gamma and beta of ``alpha * BN(x) + (1 - alpha) * BN_new(x)``: both branches
    normalise with the same batch statistics, so the pair acts as one BatchNorm whose affine is the
    blend of the two (what decides whether a channel can fire while the model trains)."""
    return alpha * gamma + (1 - alpha) * new_gamma, alpha * beta + (1 - alpha) * new_beta


def module_keys(bn_name: str, channels: int, alpha: float = 0.5, per_channel: bool = False,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The extra state-dict keys a module-mode checkpoint carries for one converted BN layer:
    a fresh branch (gamma 1, beta 0, mean 0, var 1) and the blend weight, as ABRiBatchNorm2d holds them."""
    return {
        f"{bn_name}.abri_new.weight": torch.ones(channels, dtype=dtype),
        f"{bn_name}.abri_new.bias": torch.zeros(channels, dtype=dtype),
        f"{bn_name}.abri_new.running_mean": torch.zeros(channels, dtype=dtype),
        f"{bn_name}.abri_new.running_var": torch.ones(channels, dtype=dtype),
        f"{bn_name}.abri_new.num_batches_tracked": torch.tensor(0, dtype=torch.long),
        f"{bn_name}.abri_alpha": torch.full((channels,) if per_channel else (), float(alpha), dtype=dtype),
    }

"""``--method abri``: ABRi (Feng, Xia, Hu 2023) on the flagged BatchNorm channels, folded into a drop-in
checkpoint or written as the module-mode re-parametrisation (the math is :mod:`avdiag.rewrite.abri`)."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from avdiag.errors import ModelError, UsageError
from avdiag.load import Checkpoint
from avdiag.locate import BNLayer, Located
from avdiag.locate.resolve import ResolvedModel
from avdiag.rewrite import abri
from avdiag.rewrite.methods.base import Method, Rewrite, RewriteInput, one_of, recalibrated_stats, register

MODES = ("fold", "module")
SCOPES = ("flagged", "layers", "all")
STATS = ("reset", "blend", "data")


@dataclass
class AbriOptions:
    """ABRi's settings.

    ``mode``: ``fold`` (the blend at initialisation folded into each BN: a drop-in checkpoint) or
    ``module`` (the checkpoint of the re-parametrised model, with each layer's fresh branch and alpha).
    ``alpha``: the pretrained branch's weight (0.5). ``per_channel``: module mode, one alpha per channel.
    ``scope``: ``flagged`` channels (dead or abnormal), whole ``layers`` holding one, or ``all`` BN layers.
    ``stats``: fold mode, the running statistics: ``reset`` (0, 1), ``blend`` (towards 0, 1 like the
    affine parameters) or ``data`` (re-estimated on the data); None = data with data, else blend.
    ``exact_blend``: fold mode, the paper's blend with ``alpha`` on every channel, even where it leaves a
    channel dead (a strongly negative beta halved is still strongly negative). Default (False): such a
    channel gets the largest alpha below ``alpha`` that brings its z to ``dead_z + revive_margin`` or more
    (:func:`avdiag.rewrite.abri.reviving_alpha`), and is listed as revived beyond the blend.
    ``revive_margin``: how far above the dead threshold a revived channel's z lands (2.0: z >= -1 with the
    default dead_z -3, a channel that fires for about 16 % of its inputs).
    """

    mode: str = "fold"
    alpha: float = 0.5
    per_channel: bool = False
    scope: str = "flagged"
    stats: str | None = None
    exact_blend: bool = False
    revive_margin: float = 2.0


def validate(o: AbriOptions, has_data: bool) -> None:
    one_of(o.mode, MODES, "--mode")
    one_of(o.scope, SCOPES, "--scope")
    if o.stats is not None:
        one_of(o.stats, STATS, "--stats")
    if o.stats == "data" and not has_data:
        raise UsageError("--stats data needs --data")
    if not o.revive_margin >= 0:
        raise UsageError(f"--revive-margin must be a number >= 0, got {o.revive_margin}")


def apply(target: RewriteInput, o: AbriOptions) -> Rewrite:
    scope = _scope(target, o.scope)
    if o.mode == "module":
        return _module(target, scope, o)
    return _fold(target, scope, o)


def _scope(target: RewriteInput, scope: str) -> dict[str, list[int] | None]:
    """BN layer name -> channels to rewrite (None: every channel)."""
    out: dict[str, list[int] | None] = {}
    for v in target.scoped_layers():
        flagged = sorted(set(v.dead) | set(v.abnormal))
        if scope == "all":
            out[v.layer.name] = None
        elif flagged:
            out[v.layer.name] = flagged if scope == "flagged" else None
    return out


def _module(target: RewriteInput, scope: dict[str, list[int] | None], o: AbriOptions) -> Rewrite:
    channels = {v.layer.name: v.layer.channels for v in target.layers}
    tensors: dict[str, torch.Tensor] = {}
    for name in scope:
        tensors.update(abri.module_keys(name, channels[name], o.alpha, o.per_channel))
    return Rewrite(tensors, {"method": "abri", "mode": "module", "alpha": o.alpha, "per_channel": o.per_channel,
                             "scope": o.scope, "modality": target.modality, "layers": sorted(scope),
                             "dead_after": "of each converted layer's training-mode blend (effective_affine)"},
                   scope=dict(scope))


def _fold(target: RewriteInput, scope: dict[str, list[int] | None], o: AbriOptions) -> Rewrite:
    stats = o.stats or ("data" if target.data is not None else "blend")
    layers = {v.layer.name: v.layer for v in target.layers}
    alphas = {name: _blend_alpha(target, layers[name], channels, o, stats, None) for name, channels in scope.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, channels in scope.items():
        tensors.update(_folded_layer(target, layers[name], channels, alphas[name], stats))
    if stats == "data":
        _recalibrate_into(target, scope, layers, tensors)
        if not o.exact_blend and _revive_on_data(target, scope, layers, alphas, tensors, o):
            _recalibrate_into(target, scope, layers, tensors)  # downstream layers see the revived channels
    parameters = {"method": "abri", "mode": "fold", "alpha": o.alpha, "scope": o.scope,
                  "modality": target.modality, "running_stats": stats, "exact_blend": o.exact_blend,
                  "layers": sorted(scope), "channels": {n: c for n, c in scope.items() if c is not None}}
    return Rewrite(tensors, parameters, scope=dict(scope), revived=_revived(alphas, o.alpha))


def _blend_alpha(target: RewriteInput, layer: BNLayer, channels: list[int] | None, o: AbriOptions, stats: str,
                 var: torch.Tensor | None) -> torch.Tensor | float:
    """The fold's alpha for ``layer``: ``o.alpha``, or per channel the reviving alpha where the blend would
    leave a channel dead (only for layers whose channels can die; not under ``exact_blend``)."""
    if o.exact_blend or not layer.can_die or (stats == "data" and var is None):
        return o.alpha
    if "weight" not in layer.params or "bias" not in layer.params:
        return o.alpha  # _folded_layer refuses it with a one-line error
    gamma, beta = target.affine(layer)
    t = target.thresholds
    return abri.reviving_alpha(gamma, beta, var if var is not None else target.tensor(layer.params["running_var"]),
                               layer.eps, o.alpha, "given" if var is not None else stats, channels,
                               dead_z=t.dead_z, revive_z=t.dead_z + o.revive_margin, constant_scale=t.constant_scale)


def _recalibrate_into(target: RewriteInput, scope: dict[str, list[int] | None], layers: dict[str, BNLayer],
                      tensors: dict[str, torch.Tensor]) -> None:
    estimated = recalibrated_stats(target, set(scope), tensors, "--stats data")
    for name, (mean, var) in estimated.items():
        params = layers[name].params
        for role, estimate in (("running_mean", mean), ("running_var", var)):
            tensors[params[role]] = _on_channels(target.tensor(params[role]), estimate, scope[name])


def _revive_on_data(target: RewriteInput, scope: dict[str, list[int] | None], layers: dict[str, BNLayer],
                    alphas: dict[str, torch.Tensor | float], tensors: dict[str, torch.Tensor],
                    o: AbriOptions) -> bool:
    """With statistics re-estimated on data, fold again with a reviving alpha where the blend leaves a
    channel dead under those statistics; True when some alpha changed."""
    changed = False
    for name, channels in scope.items():
        layer = layers[name]
        var = tensors[layer.params["running_var"]] if layer.params.get("running_var") in tensors else None
        alpha = _blend_alpha(target, layer, channels, o, "data", var)
        if isinstance(alpha, torch.Tensor) and bool((alpha != o.alpha).any()):
            alphas[name] = alpha
            tensors.update(_folded_layer(target, layer, channels, alpha, "data"))
            changed = True
    return changed


def _revived(alphas: dict[str, torch.Tensor | float], alpha: float) -> dict[str, dict[str, list]]:
    """Layer -> the channels folded with a smaller alpha than the blend's, and those alphas."""
    out = {}
    for name, a in alphas.items():
        if not isinstance(a, torch.Tensor):
            continue
        idx = torch.nonzero(a != alpha).flatten().tolist()
        if idx:
            out[name] = {"channels": idx, "alpha": [round(float(a[i]), 6) for i in idx]}
    return out


def _folded_layer(target: RewriteInput, layer: BNLayer, channels: list[int] | None, alpha: float | torch.Tensor,
                  stats: str) -> dict[str, torch.Tensor]:
    """The new affine parameters of one layer (and its running statistics unless they come from data)."""
    if "weight" not in layer.params or "bias" not in layer.params:
        raise UsageError(f"{layer.name}: a BatchNorm without affine parameters cannot take the ABRi blend")
    idx = None if channels is None else torch.tensor(channels, dtype=torch.long)
    gamma, beta = target.affine(layer)
    out = dict(zip((layer.params["weight"], layer.params["bias"]), abri.fold_init(gamma, beta, alpha, idx)))
    if stats == "data":
        return out
    mean, var = target.tensor(layer.params["running_mean"]), target.tensor(layer.params["running_var"])
    if stats == "blend":
        mean, var = abri.blend_running_stats(mean, var, alpha, idx)
    else:
        mean, var = abri.reset_running_stats(mean, var, idx)
    out[layer.params["running_mean"]], out[layer.params["running_var"]] = mean, var
    return out


def _on_channels(original: torch.Tensor, estimate: torch.Tensor, channels: list[int] | None) -> torch.Tensor:
    """``estimate`` on ``channels`` (all when None), ``original`` elsewhere, in the original dtype."""
    if channels is None:
        return estimate.to(original.dtype)
    out = original.clone()
    out[channels] = estimate[channels].to(original.dtype)
    return out


def effective_tensors(written: Checkpoint, o: AbriOptions) -> dict[str, torch.Tensor] | None:
    """Module mode: the written state dict with each converted layer's pair folded into its
    training-mode blend (:func:`avdiag.rewrite.abri.effective_affine`) and the ``abri_`` keys left out,
    so the scan after the rewrite judges the layers the model trains with. Fold mode: None."""
    if o.mode != "module":
        return None
    store = written.tensors
    out = {n: store.get(n) for n in store.names() if ".abri_new." not in n and not n.endswith(".abri_alpha")}
    for name in (n[: -len(".abri_alpha")] for n in store.names() if n.endswith(".abri_alpha")):
        weight, bias = f"{name}.weight", f"{name}.bias"
        alpha = store.get(f"{name}.abri_alpha").to(out[weight].dtype)
        new_gamma, new_beta = store.get(f"{name}.abri_new.weight"), store.get(f"{name}.abri_new.bias")
        out[weight], out[bias] = abri.effective_affine(out[weight], out[bias], alpha, new_gamma, new_beta)
    return out


def written_model(written: Checkpoint, located: Located, o: AbriOptions, factory: str | None) -> ResolvedModel | None:
    """Module mode writes extra keys no plain architecture takes: its forward check runs the converted
    built-in architecture, strictly loaded. Fold mode writes a drop-in checkpoint (None: resolve as usual)."""
    if o.mode != "module":
        return None
    from avdiag.models.registry import build, spec_from_checkpoint

    abri_layers = {n[: -len(".abri_alpha")] for n in written.tensors.names() if n.endswith(".abri_alpha")}
    spec = spec_from_checkpoint(written.tensors, located.layout.name, located.layout.fusion)
    if spec is None or factory:
        raise ModelError("module-mode check needs a built-in architecture")
    module = abri.convert(build(spec), per_channel=o.per_channel, include=lambda name: name in abri_layers)
    module.load_state_dict({n: written.tensors.get(n) for n in written.tensors.names()}, strict=True)
    return ResolvedModel(module.eval(), f"registry:{spec.name}", spec.inputs, spec.visual_layout, spec)


METHOD = register(Method(
    name="abri", options=AbriOptions, apply=apply, validate=validate, written_model=written_model,
    effective_tensors=effective_tensors,
    description="ABRi: blend each flagged BN with a fresh one (Feng, Xia, Hu 2023)"))

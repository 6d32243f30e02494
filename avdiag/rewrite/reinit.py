"""`reinit_checkpoint`: rewrite a checkpoint with ABRi, a reset, re-learning or BN recalibration,
write it atomically in the input's format, and verify the written file before reporting success."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avdiag._version import __version__
from avdiag.errors import UsageError, VerificationError
from avdiag.inspection import InspectResult, ProbeOptions, pick_device, scan
from avdiag.load import Checkpoint, load_checkpoint
from avdiag.locate import Located, locate, parse_overrides
from avdiag.measure.thresholds import Thresholds
from avdiag.rewrite import abri

METHODS = ("abri", "reset", "relearn", "recalibrate")
SCOPES = ("flagged", "layers", "all")
STATS = ("reset", "blend", "data")
SCHEMA_VERSION = "1.0"


@dataclass
class RewriteOptions:
    method: str = "abri"
    mode: str = "fold"  # abri: fold (drop-in checkpoint) / module (re-parametrisation keys)
    alpha: float = 0.5  # abri blend
    per_channel: bool = False  # abri module: one alpha per channel
    scope: str = "flagged"  # flagged channels / layers holding them / all BN layers
    modality: str | None = None  # restrict the scope to one modality
    stats: str | None = None  # abri fold running stats: reset / blend / data (default: data with data, else blend)
    variant: str = "all"  # reset: all / tiny-gamma
    tiny_gamma: float = 1e-6
    lam: float = 3.0  # relearn: alpha = tanh(lam * gap)
    alphas: dict[str, float] = field(default_factory=dict)  # relearn: given alpha per modality skips diagnosis
    init_ckpt: str | None = None  # relearn: theta_init
    seed: int = 0  # relearn: seed of the generated initialisation
    heldout_split: str = "test"  # relearn: the held-out split
    data: ProbeOptions | None = None  # data + model + device for data-driven steps


@dataclass
class TensorChange:
    name: str
    channels_changed: int
    norm_before: float | None
    norm_after: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RewriteResult:
    source: dict[str, Any]
    target: str
    method: str
    parameters: dict[str, Any]
    changes: list[TensorChange]
    dead_before: dict[str, int]
    dead_after: dict[str, int]
    verification: dict[str, Any]
    warnings: list[str]
    diagnosis: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        dead = ", ".join(f"{m} {self.dead_before.get(m, 0)} -> {self.dead_after.get(m, 0)}" for m in self.dead_before)
        return (f"{self.method}: {len(self.changes)} tensors rewritten into {self.target}; "
                f"dead channels {dead}; verified ({self.verification['identical']} tensors bit-identical"
                f"{', forward ' + self.verification['forward'] if self.verification.get('forward') else ''})")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION,
                "tool": {"name": "avdiag", "version": __version__, "command": "reinit"},
                "source": self.source, "target": self.target, "method": self.method,
                "parameters": self.parameters, "diagnosis": self.diagnosis,
                "changes": [c.to_dict() for c in self.changes],
                "dead_before": self.dead_before, "dead_after": self.dead_after,
                "verification": self.verification, "warnings": self.warnings, "summary": self.summary_line()}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([c.to_dict() for c in self.changes])


def reinit_checkpoint(path: str | Path, out: str | Path, options: RewriteOptions | None = None, *,
                      thresholds: Thresholds | None = None, modality_prefixes: list[str] | None = None,
                      allow_globals: tuple[str, ...] = (), unsafe: bool = False, in_place: bool = False,
                      drop_optimizer: bool = False, fmt: str | None = None) -> RewriteResult:
    """Rewrite ``path`` into ``out`` (see RewriteOptions) and verify the written file."""
    from avdiag.load.write import Provenance, write_checkpoint

    opts = options or RewriteOptions()
    _validate(opts)
    thresholds = thresholds or Thresholds()
    ckpt = load_checkpoint(path, allow_globals=allow_globals, unsafe=unsafe)
    located = locate(ckpt, modality_overrides=parse_overrides(modality_prefixes) if modality_prefixes else None)
    before = scan(ckpt, located, thresholds)
    new, parameters, diagnosis = _rewrite(ckpt, located, before, opts)
    if not new:
        raise UsageError(f"{ckpt.path}: nothing in scope to rewrite (scope {opts.scope!r}"
                         f"{', modality ' + opts.modality if opts.modality else ''})")
    provenance = Provenance(opts.method, parameters, before.checkpoint.sha256, __version__)
    target = Path(out)
    verification: dict[str, Any] = {}

    def verify(written: Path) -> None:
        # Runs on the temporary file before it replaces the target: a failed check leaves the target
        # (and, with --in-place, the input) untouched.
        try:
            verification.update(_verify(ckpt, new, written, located, opts, allow_globals))
        except VerificationError:
            raise
        except Exception as e:
            raise VerificationError(f"{target}: verifying the written file failed ({type(e).__name__}: {e}); "
                                    "nothing was written") from e

    warnings = write_checkpoint(ckpt, new, target, provenance=provenance, drop_optimizer=drop_optimizer,
                                in_place=in_place, fmt=fmt, verify=verify)
    written = load_checkpoint(target, allow_globals=allow_globals)
    overrides = located.layout.modalities if located.layout.source == "user" else None
    after = scan(written, locate(written, modality_overrides=overrides), thresholds, hash_file=False)
    return RewriteResult(
        source={"path": str(ckpt.path), "format": ckpt.format, "sha256": before.checkpoint.sha256},
        target=str(target), method=opts.method, parameters=parameters,
        changes=_changes(ckpt, new), dead_before=_dead(before), dead_after=_dead(after),
        verification=verification, warnings=warnings, diagnosis=diagnosis)


def _validate(o: RewriteOptions) -> None:
    checks = [(o.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
              (o.mode in ("fold", "module"), "--mode must be fold or module"),
              (o.scope in SCOPES, f"--scope must be one of {', '.join(SCOPES)}"),
              (o.stats is None or o.stats in STATS, f"--stats must be one of {', '.join(STATS)}"),
              (o.variant in ("all", "tiny-gamma"), "--variant must be all or tiny-gamma"),
              (o.stats != "data" or o.data is not None, "--stats data needs --data"),
              (o.method not in ("recalibrate",) or o.data is not None, "--method recalibrate needs --data"),
              (o.method != "relearn" or o.data is not None or o.alphas,
               "--method relearn needs --data (or --alpha-audio/--alpha-visual to skip the diagnosis)")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _rewrite(ckpt: Checkpoint, located: Located, before: InspectResult, o: RewriteOptions):
    if o.method == "abri":
        return _abri(ckpt, located, before, o)
    if o.method == "reset":
        return _reset(ckpt, before, o)
    if o.method == "recalibrate":
        layers = [v.layer for v in before.layers if _in_modality(v.layer.modality, o)]
        stats = _recalibrated(ckpt, located, o, {layer.name for layer in layers}, {})
        new = {}
        for layer in layers:
            mean, var = stats[layer.name]
            new[layer.params["running_mean"]], new[layer.params["running_var"]] = mean, var
        return new, {"method": "recalibrate", "modality": o.modality, "layers": len(layers)}, {}
    return _relearn(ckpt, located, o)


def _in_modality(modality: str, o: RewriteOptions) -> bool:
    return o.modality is None or modality == o.modality


def _scope(before: InspectResult, o: RewriteOptions) -> dict[str, list[int] | None]:
    """BN layer name -> channels to rewrite (None = every channel)."""
    out: dict[str, list[int] | None] = {}
    for v in before.layers:
        if not _in_modality(v.layer.modality, o):
            continue
        flagged = sorted(set(v.dead) | set(v.abnormal))
        if o.scope == "all":
            out[v.layer.name] = None
        elif flagged:
            out[v.layer.name] = flagged if o.scope == "flagged" else None
    return out


def _abri(ckpt: Checkpoint, located: Located, before: InspectResult, o: RewriteOptions):
    scope = _scope(before, o)
    layers = {v.layer.name: v.layer for v in before.layers}
    if o.mode == "module":
        new = {}
        for name in scope:
            new.update(abri.module_keys(name, layers[name].channels, o.alpha, o.per_channel))
        return new, {"method": "abri", "mode": "module", "alpha": o.alpha, "per_channel": o.per_channel,
                     "scope": o.scope, "modality": o.modality, "layers": sorted(scope)}, {}
    stats = o.stats or ("data" if o.data is not None else "blend")
    new: dict[str, torch.Tensor] = {}
    for name, channels in scope.items():
        layer = layers[name]
        idx = None if channels is None else torch.tensor(channels, dtype=torch.long)
        gamma, beta = _affine(ckpt, layer)
        new_gamma, new_beta = abri.fold_init(gamma, beta, o.alpha, idx)
        if "weight" not in layer.params or "bias" not in layer.params:
            raise UsageError(f"{name}: a BatchNorm without affine parameters cannot take the ABRi blend")
        new[layer.params["weight"]], new[layer.params["bias"]] = new_gamma, new_beta
        mean, var = ckpt.tensors.get(layer.params["running_mean"]), ckpt.tensors.get(layer.params["running_var"])
        if stats == "blend":
            mean, var = abri.blend_running_stats(mean, var, o.alpha, idx)
        elif stats == "reset":
            mean, var = abri.reset_running_stats(mean, var, idx)
        if stats != "data":
            new[layer.params["running_mean"]], new[layer.params["running_var"]] = mean, var
    if stats == "data":
        estimated = _recalibrated(ckpt, located, o, set(scope), new)
        for name, (mean, var) in estimated.items():
            layer, channels = layers[name], scope[name]
            new[layer.params["running_mean"]] = _on_channels(ckpt.tensors.get(layer.params["running_mean"]), mean, channels)
            new[layer.params["running_var"]] = _on_channels(ckpt.tensors.get(layer.params["running_var"]), var, channels)
    return new, {"method": "abri", "mode": "fold", "alpha": o.alpha, "scope": o.scope, "modality": o.modality,
                 "running_stats": stats, "layers": sorted(scope),
                 "channels": {n: c for n, c in scope.items() if c is not None}}, {}


def _affine(ckpt: Checkpoint, layer) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = ckpt.tensors.get(layer.params["weight"]) if "weight" in layer.params else torch.ones(layer.channels)
    beta = ckpt.tensors.get(layer.params["bias"]) if "bias" in layer.params else torch.zeros(layer.channels)
    return gamma, beta


def _on_channels(original: torch.Tensor, estimate: torch.Tensor, channels: list[int] | None) -> torch.Tensor:
    if channels is None:
        return estimate.to(original.dtype)
    out = original.clone()
    out[channels] = estimate[channels].to(original.dtype)
    return out


def _reset(ckpt: Checkpoint, before: InspectResult, o: RewriteOptions):
    """The ABRi paper's baselines: reset every BN, or only the channels with |gamma| < tiny_gamma."""
    new = {}
    touched = []
    for v in before.layers:
        layer = v.layer
        if not _in_modality(layer.modality, o) or "weight" not in layer.params:
            continue
        gamma, beta = _affine(ckpt, layer)
        idx = None if o.variant == "all" else torch.nonzero(gamma.abs() < o.tiny_gamma).flatten()
        if idx is not None and idx.numel() == 0:
            continue
        rows = slice(None) if idx is None else idx
        values = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
        for role, value in values.items():
            if role in layer.params:
                t = ckpt.tensors.get(layer.params[role]).clone()
                t[rows] = value
                new[layer.params[role]] = t
        touched.append(layer.name)
    return new, {"method": "reset", "variant": o.variant, "tiny_gamma": o.tiny_gamma, "modality": o.modality,
                 "layers": touched}, {}


def _resolved(ckpt: Checkpoint, located: Located, o: RewriteOptions, new: dict[str, torch.Tensor]):
    from avdiag.locate.resolve import resolve_model

    resolved = resolve_model(ckpt, located.layout, o.data.model if o.data else None)
    if new:
        prefix = resolved.name_prefix
        resolved.module.load_state_dict({k[len(prefix):]: v for k, v in new.items() if k.startswith(prefix)},
                                        strict=False)
    return resolved


def _loader(o: RewriteOptions, split: str | None = None):
    from avdiag.data import DataOptions, make_loader, open_dataset

    d = o.data
    dataset = d.data if not isinstance(d.data, str) else open_dataset(
        d.data, split=split or d.split, options=d.data_options or DataOptions())
    return dataset, make_loader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, limit=d.limit,
                                seed=d.seed)


def _recalibrated(ckpt: Checkpoint, located: Located, o: RewriteOptions, names: set[str],
                  new: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from avdiag.rewrite.recalibrate import recalibrate

    resolved = _resolved(ckpt, located, o, new)
    _, loader = _loader(o)
    return recalibrate(resolved, names, loader, pick_device(o.data.device))


def _relearn(ckpt: Checkpoint, located: Located, o: RewriteOptions):
    from avdiag.measure import learning_state
    from avdiag.rewrite import relearn

    prefixes = dict(located.layout.modalities)
    if not prefixes:
        raise UsageError("--method relearn needs a multimodal checkpoint (use --modality NAME=PREFIX)")
    diagnosis = {}
    alphas = dict(o.alphas)
    missing = [m for m in prefixes if m not in alphas and (not o.modality or m == o.modality)]
    if missing and o.data is None:
        raise UsageError(f"--method relearn needs --data to diagnose {', '.join(missing)} "
                         f"(or --alpha-{missing[0]})")
    if missing:
        resolved = _resolved(ckpt, located, o, {})
        device = pick_device(o.data.device)
        train_ds, train = _loader(o)
        _, held = _loader(o, split=o.heldout_split)
        f_train, y_train = learning_state.encoder_features(resolved, prefixes, train, device)
        f_held, y_held = learning_state.encoder_features(resolved, prefixes, held, device)
        k = len(getattr(train_ds, "classes", [])) or int(max(y_train.max(), y_held.max()) + 1)
        for m in missing:
            state = learning_state.LearningState(m, learning_state.cluster_purity(f_train[m], y_train, k, o.seed),
                                          learning_state.cluster_purity(f_held[m], y_held, k, o.seed),
                                          len(y_train), len(y_held))
            diagnosis[m] = state.to_dict(o.lam)
            alphas[m] = state.alpha(o.lam)
    initial = _initial_weights(ckpt, located, o)
    names = ckpt.tensors.names()
    shapes = {n: ckpt.tensors.info(n).shape for n in names}
    new = {}
    for m, prefix in prefixes.items():
        if o.modality and m != o.modality:
            continue
        for n in relearn.relearn_targets(names, shapes, prefix):
            if n not in initial or initial[n].shape != ckpt.tensors.get(n).shape:
                raise UsageError(f"the initial weights lack {n} (or its shape differs)")
            new[n] = relearn.soft_reinit(ckpt.tensors.get(n), initial[n], alphas[m])
    params = {"method": "relearn", "lam": o.lam, "alphas": alphas, "seed": o.seed,
              "init": o.init_ckpt or f"generated (seed {o.seed})", "modality": o.modality}
    return new, params, diagnosis


def _initial_weights(ckpt: Checkpoint, located: Located, o: RewriteOptions) -> dict[str, torch.Tensor]:
    if o.init_ckpt:
        init = load_checkpoint(o.init_ckpt)
        return {n: init.tensors.get(n) for n in init.tensors.names()}
    from avdiag.locate.resolve import ModelError
    from avdiag.models.registry import build, spec_from_checkpoint

    from avdiag.locate.resolve import outer_prefix

    outer = outer_prefix(located.layout)
    inner = ckpt.tensors.renamed(lambda n: n[len(outer):] if n.startswith(outer) else n)
    spec = spec_from_checkpoint(inner, located.layout.name, located.layout.fusion)
    if spec is None:
        raise ModelError("no built-in architecture fits this checkpoint: pass --init-ckpt with the initial weights")
    torch.manual_seed(o.seed)
    return {outer + k: v for k, v in build(spec).state_dict().items()}


def _changes(ckpt: Checkpoint, new: dict[str, torch.Tensor]) -> list[TensorChange]:
    out = []
    for name, tensor in new.items():
        before = ckpt.tensors.get(name) if name in ckpt.tensors else None
        if before is not None and before.shape == tensor.shape:
            rows = (before.reshape(before.shape[0], -1) != tensor.reshape(tensor.shape[0], -1)).any(dim=1) \
                if before.dim() else (before != tensor).reshape(1)
            channels = int(rows.sum())
            norm_before = float(before.double().norm())
        else:
            channels, norm_before = (tensor.shape[0] if tensor.dim() else 1), None
        out.append(TensorChange(name, channels, norm_before, float(tensor.double().norm())))
    return out


def _dead(result: InspectResult) -> dict[str, int]:
    return {name: m.n_dead for name, m in result.modalities.items()}


def _verify(ckpt: Checkpoint, new: dict[str, torch.Tensor], target: Path, located: Located,
            o: RewriteOptions, allow_globals: tuple[str, ...]) -> dict[str, Any]:
    """Reload the written file: every tensor outside the rewrite is bit-identical, the rewritten ones
    hold the intended values; with a resolvable model, one forward pass gives finite outputs."""
    written = load_checkpoint(target, allow_globals=allow_globals)
    problems = []
    identical = 0
    for name in ckpt.tensors.names():
        if name in new:
            continue
        if name not in written.tensors or not _same_bits(ckpt.tensors.get(name), written.tensors.get(name)):
            problems.append(name)
        else:
            identical += 1
    for name, tensor in new.items():
        if name not in written.tensors or not _same_bits(tensor, written.tensors.get(name)):
            problems.append(name)
    if problems:
        raise VerificationError(f"the written file differs from the intended rewrite at {len(problems)} "
                                f"tensor(s), e.g. {problems[0]}; nothing was written")
    return {"reloaded": True, "identical": identical, "rewritten": len(new),
            "forward": _forward_check(written, located, o, target)}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _forward_check(written: Checkpoint, located: Located, o: RewriteOptions, target: Path) -> str:
    from avdiag.locate.resolve import ModelError, resolve_model

    model_spec = o.data.model if o.data else None
    try:
        if o.method == "abri" and o.mode == "module":
            resolved = _module_mode_model(written, located, model_spec)
        else:
            resolved = resolve_model(written, located.layout, model_spec)
    except ModelError:
        return "skipped (no model: pass --model to check a forward pass)"
    batch = _first_batch(o) if o.data is not None else _synthetic_batch(resolved.inputs)
    try:
        with torch.inference_mode():
            outputs = resolved(batch)
    except ModelError as e:
        if o.data is not None:
            raise
        return f"skipped (the model does not take avdiag's synthetic batch: {e}; pass --data to check)"
    tensors = [t for t in _flatten(outputs) if isinstance(t, torch.Tensor)]
    if not tensors or not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise VerificationError("a forward pass of the rewritten model gives non-finite outputs; nothing was written")
    return "finite"


def _module_mode_model(written: Checkpoint, located: Located, model_spec: str | None):
    from avdiag.locate.resolve import ModelError, ResolvedModel
    from avdiag.models.registry import build, spec_from_checkpoint

    abri_layers = {n[: -len(".abri_alpha")] for n in written.tensors.names() if n.endswith(".abri_alpha")}
    base = written.tensors.names()
    spec = spec_from_checkpoint(written.tensors, located.layout.name, located.layout.fusion)
    if spec is None or model_spec:
        raise ModelError("module-mode check needs a built-in architecture")
    per_channel = any(len(written.tensors.info(n + ".abri_alpha").shape) == 1 for n in abri_layers)
    module = abri.convert(build(spec), per_channel=per_channel, include=lambda name: name in abri_layers)
    module.load_state_dict({n: written.tensors.get(n) for n in base}, strict=True)
    return ResolvedModel(module.eval(), f"registry:{spec.name}", spec.inputs, spec.visual_layout, spec)


def _first_batch(o: RewriteOptions) -> dict[str, torch.Tensor]:
    _, loader = _loader(o)
    return next(iter(loader))


def _synthetic_batch(inputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"audio": torch.randn(2, 128, 96, generator=g), "visual": torch.randn(2, 3, 1, 64, 64, generator=g),
            "label": torch.zeros(2, dtype=torch.long)}


def _flatten(x: Any):
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _flatten(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _flatten(item)
    else:
        yield x


__all__ = ["METHODS", "RewriteOptions", "RewriteResult", "TensorChange", "VerificationError", "reinit_checkpoint"]

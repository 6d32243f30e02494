"""``--method relearn``: Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024). Each encoder's learning
state on the data gives alpha_m = tanh(lam * purity gap) (:mod:`avdiag.measure.contribution.learning_state`); its conv
weights and BN gamma/beta move towards their initial values by alpha_m (:mod:`avdiag.rewrite.relearn`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from avdiag.errors import ModelError, UsageError
from avdiag.locate.transformer_layouts import SHARED
from avdiag.rewrite import relearn
from avdiag.rewrite.methods.base import DataAccess, Method, Rewrite, RewriteInput, register
from avdiag.rewrite.precision import autocast


@dataclass
class RelearnOptions:
    """Re-learning's settings.

    ``lam``: alpha = tanh(lam * gap) (3.0). ``alphas``: a given alpha per modality (``{"audio": 0.3}``)
    skips that modality's diagnosis. ``init_ckpt``: a checkpoint with the initial weights (default: the
    built-in architecture's initialisation drawn with ``seed``). ``seed``: seed of that initialisation
    and of the k-means of the diagnosis (0). ``heldout_split``: the data's held-out split ("test").
    """

    lam: float = 3.0
    alphas: dict[str, float] = field(default_factory=dict)
    init_ckpt: str | None = None
    seed: int = 0
    heldout_split: str = "test"


def validate(o: RelearnOptions, has_data: bool) -> None:
    if not has_data and not o.alphas:
        raise UsageError("--method relearn needs --data (or --alpha-audio/--alpha-visual to skip the diagnosis)")


def apply(target: RewriteInput, o: RelearnOptions) -> Rewrite:
    # the modalities with an encoder of their own: blocks both modalities' tokens pass through are not one
    prefixes = {m: p for m, p in target.located.layout.modalities.items() if m != SHARED}
    if not prefixes:
        raise UsageError("--method relearn needs a multimodal checkpoint (use --modality NAME=PREFIX)")
    alphas = dict(o.alphas)
    missing = [m for m in prefixes if m not in alphas and target.in_scope(m)]
    if missing and target.data is None:
        raise UsageError(f"--method relearn needs --data to diagnose {', '.join(missing)} "
                         f"(or --alpha-{missing[0]})")
    diagnosis = _diagnose(target.data, prefixes, missing, o) if missing else {}
    alphas.update({m: d["alpha"] for m, d in diagnosis.items()})
    moving = any(alphas.get(m, 0.0) != 0 for m in prefixes if target.in_scope(m))
    initial = _initial_weights(target, o) if moving else {}
    tensors, per_modality = _soft_reinit(target, list(prefixes), alphas, initial)
    parameters = {"method": "relearn", "lam": o.lam, "alphas": alphas, "seed": o.seed,
                  "init": o.init_ckpt or f"generated (seed {o.seed})", "modality": target.modality,
                  "per_modality": per_modality}
    return Rewrite(tensors, parameters, diagnosis)


def _diagnose(data: DataAccess, prefixes: dict[str, str], modalities: list[str],
              o: RelearnOptions) -> dict[str, dict[str, Any]]:
    """The learning state of each of ``modalities``: cluster purity on the training and held-out splits."""
    from avdiag.measure.contribution import learning_state

    resolved = data.model()
    with autocast(data.device, data.amp):
        f_train, y_train = learning_state.encoder_features(resolved, prefixes, data.batches(None), data.device)
        f_held, y_held = learning_state.encoder_features(resolved, prefixes, data.batches(o.heldout_split),
                                                         data.device)
    k = data.classes(None) or int(max(y_train.max(), y_held.max()) + 1)
    out = {}
    for m in modalities:
        state = learning_state.LearningState(m, learning_state.cluster_purity(f_train[m], y_train, k, o.seed),
                                             learning_state.cluster_purity(f_held[m], y_held, k, o.seed),
                                             len(y_train), len(y_held))
        out[m] = state.to_dict(o.lam)
    return out


def _soft_reinit(target: RewriteInput, modalities: list[str], alphas: dict[str, float],
                 initial: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The re-initialised tensors that differ from the checkpoint's, and per modality in scope what
    happened to it ("alpha 0: unchanged", "alpha 0.42: 20 tensors rewritten"). A tensor belongs to
    the modality the layout gives it (name patterns for transformer layouts, not one prefix)."""
    names = target.ckpt.tensors.names()
    shapes = {n: target.ckpt.tensors.info(n).shape for n in names}
    modality_of = target.located.layout.modality_of
    tensors: dict[str, torch.Tensor] = {}
    per_modality: dict[str, str] = {}
    for m in modalities:
        if not target.in_scope(m):
            continue
        if alphas[m] == 0:
            per_modality[m] = "alpha 0: unchanged"
            continue
        changed = 0
        for n in relearn.relearn_targets(names, shapes, lambda n, m=m: modality_of(n) == m):
            current = target.tensor(n)
            if n not in initial or initial[n].shape != current.shape:
                raise UsageError(f"the initial weights lack {n} (or its shape differs)")
            mixed = relearn.soft_reinit(current, initial[n], alphas[m])
            if not torch.equal(mixed, current):
                tensors[n] = mixed
                changed += 1
        per_modality[m] = f"alpha {alphas[m]:.3g}: {changed} tensors rewritten"
    return tensors, per_modality


def _initial_weights(target: RewriteInput, o: RelearnOptions) -> dict[str, torch.Tensor]:
    """theta_init: the given checkpoint's tensors, or the built-in architecture initialised with ``seed``."""
    from avdiag.load import load_checkpoint

    if o.init_ckpt:
        init = load_checkpoint(o.init_ckpt)
        return {n: init.tensors.get(n) for n in init.tensors.names()}
    from avdiag.locate.resolve import outer_prefix
    from avdiag.models.registry import build, spec_from_checkpoint

    layout = target.located.layout
    outer = outer_prefix(layout)
    inner = target.ckpt.tensors.renamed(lambda n: n[len(outer):] if n.startswith(outer) else n)
    spec = spec_from_checkpoint(inner, layout.name, layout.fusion)
    if spec is None:
        raise ModelError("no built-in architecture fits this checkpoint: pass --init-ckpt with the initial weights")
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(o.seed)
        return {outer + k: v for k, v in build(spec).state_dict().items()}


METHOD = register(Method(name="relearn", options=RelearnOptions, apply=apply, validate=validate,
                         description="Diagnosing & Re-learning: soft re-initialisation by learning state"))

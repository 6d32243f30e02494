"""``--method recalibrate``: re-estimate the running statistics of the BatchNorm layers in scope on the
data, nothing else (the cross-modal case: an encoder initialised from another modality keeps that
modality's statistics). The estimation is :mod:`avdiag.rewrite.recalibrate`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avdiag.errors import ModelError, UsageError
from avdiag.rewrite.methods.base import Method, Rewrite, RewriteInput, recalibrated_stats, register


@dataclass
class RecalibrateOptions:
    """No settings of its own: the layers are those of the modality the rewrite is restricted to (all
    BN layers without a restriction), the batches those of the data's split."""


def validate(o: RecalibrateOptions, has_data: bool) -> None:
    if not has_data:
        raise UsageError("--method recalibrate needs --data")


def apply(target: RewriteInput, o: RecalibrateOptions) -> Rewrite:
    layers = [v.layer for v in target.scoped_layers()]
    stats = recalibrated_stats(target, {layer.name for layer in layers}, {}, "--method recalibrate")
    missing = [layer.name for layer in layers if layer.name not in stats]
    if missing:
        raise ModelError(f"the model has no BatchNorm module {missing[0]} to recalibrate "
                         f"({len(missing)} layer(s) missing; check --model)")
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        mean, var = stats[layer.name]
        tensors[layer.params["running_mean"]], tensors[layer.params["running_var"]] = mean, var
    return Rewrite(tensors, {"method": "recalibrate", "modality": target.modality, "layers": len(layers)})


METHOD = register(Method(name="recalibrate", options=RecalibrateOptions, apply=apply, validate=validate,
                         description="re-estimate BatchNorm running statistics on the data"))

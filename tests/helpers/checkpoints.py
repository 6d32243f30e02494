"""Audio-visual checkpoints of the research layouts, saved the way the research code saves them.

A model is a built-in classifier (``avdiag.models``) at stem width 8 by default. With ``realistic``
its BatchNorm layers get trained-looking statistics (nothing flagged); with ``planted`` the dead,
abnormal and decoy channels of :mod:`layout_fixtures` are planted on top (``.planted`` says which).
The file holds ``{"model": state}`` with every key prefixed ``module.`` (DataParallel), as OGM-GE and
MMPareto save their best model; ``key=None`` writes the bare state dict and ``prefix=""`` drops the
prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avdiag.models import MMParetoClassifier, OGMGEClassifier
from layout_fixtures import N_CLASSES, WIDTH, Planted, planted_av, realistic_bn, state_dict


@dataclass
class AVCheckpoint:
    """A written checkpoint, the model its state came from (eval mode), and what was planted in it."""

    path: Path
    model: nn.Module
    planted: Planted | None


def av_model(arch: str = "ogm-ge", *, n_classes: int = N_CLASSES, width: int = WIDTH, fusion: str = "concat",
             seed: int = 0, realistic: bool = False, planted: bool = False) -> tuple[nn.Module, Planted | None]:
    """A fresh ``arch`` ("ogm-ge" or "mmpareto") classifier built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if arch == "ogm-ge":
        model = OGMGEClassifier(n_classes, fusion=fusion, width=width)
    elif arch == "mmpareto":
        model = MMParetoClassifier(n_classes, width=width)
    else:
        raise ValueError(f"no test builder for {arch!r}")
    if planted:
        return model, planted_av(model, "audio_net", "visual_net", seed)
    if realistic:
        realistic_bn(model, seed)
    return model.eval(), None


def save_av(model: nn.Module, path: Path, *, prefix: str = "module.", key: str | None = "model",
            extra: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s state as ``{key: state, **extra}`` (or bare when ``key`` is None), keys prefixed."""
    state = state_dict(model, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if key is None else {key: state, **(extra or {})}, path)
    return path


def write_av_checkpoint(path: Path, arch: str = "ogm-ge", *, prefix: str = "module.", key: str | None = "model",
                        extra: dict[str, Any] | None = None, **model_options: Any) -> AVCheckpoint:
    """Build an ``arch`` classifier (options of :func:`av_model`) and save it at ``path``."""
    model, planted = av_model(arch, **model_options)
    return AVCheckpoint(save_av(model, path, prefix=prefix, key=key, extra=extra), model, planted)

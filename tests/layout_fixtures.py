"""Helpers for test_formats.py and test_layouts.py (a helper module, not a test file).

Models come from ``avdiag.models`` at stem width 8.  Every BatchNorm layer is first given
trained-looking statistics (nothing flagged), then a few channels are planted:

* dead: ``gamma = 0.05``, ``beta = -0.5`` (z ~ -10) in a BN that feeds a ReLU (a block's ``bn1``
  or the stem ``bn1``), so the ReLU after it never fires;
* abnormal pair: ``gamma = 3e-13``, ``beta = -2e-13`` (Feng et al. 2023) in a block's ``bn2``,
  which feeds the residual add: abnormal (and constant), but not dead;
* decoy: the dead values in a BN that feeds the residual add (``bn2`` or ``downsample.1``): the
  add, not a ReLU, reads it, so it must NOT be reported dead.

Layer names in the plans are relative to a ResNet-18 encoder; :func:`plant_encoder` prefixes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avdiag.models import resnet18

WIDTH = 8
N_CLASSES = 6
DEAD_GAMMA, DEAD_BETA = 0.05, -0.5
TINY_GAMMA, TINY_BETA = 3e-13, -2e-13

# Channels at width 8: stem and layer1 have 8, layer2 16, layer3 32, layer4 64.
AUDIO_DEAD = {"bn1": [1, 5], "layer1.0.bn1": [0, 3, 7], "layer3.1.bn1": [2, 30]}
VISUAL_DEAD = {"layer2.1.bn1": [4], "layer4.0.bn1": [0, 17, 63]}
AUDIO_ABNORMAL = {"layer2.0.bn2": [4, 9]}
VISUAL_ABNORMAL = {"layer4.1.bn2": [60]}
DECOYS = {"layer1.1.bn2": [6], "layer3.0.downsample.1": [11]}


@dataclass
class Planted:
    """What was planted, under the names avdiag reports (wrapper prefixes stripped)."""

    dead: dict[str, list[int]] = field(default_factory=dict)
    abnormal: dict[str, list[int]] = field(default_factory=dict)
    dead_by_modality: dict[str, int] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> "Planted":
        return Planted({prefix + k: v for k, v in self.dead.items()},
                       {prefix + k: v for k, v in self.abnormal.items()}, dict(self.dead_by_modality))


@torch.no_grad()
def realistic_bn(model: nn.Module, seed: int = 0) -> None:
    """running_var ~ U(0.5, 2), running_mean ~ N(0, 0.1), gamma ~ N(1, 0.1) >= 0.5, beta ~ N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    for _, bn in sorted((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)):
        c = bn.num_features
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
        bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        bn.weight.copy_((1.0 + 0.1 * torch.randn(c, generator=gen)).clamp_min(0.5))
        bn.bias.copy_(0.05 * torch.randn(c, generator=gen))
        bn.num_batches_tracked.fill_(3150)


@torch.no_grad()
def _set(model: nn.Module, plan: dict[str, list[int]], gamma: float, beta: float) -> None:
    modules = dict(model.named_modules())
    for layer, channels in plan.items():
        bn = modules[layer]
        assert isinstance(bn, nn.BatchNorm2d) and max(channels) < bn.num_features, layer
        bn.weight[channels] = gamma
        bn.bias[channels] = beta


def plant_encoder(model: nn.Module, encoder: str, dead: dict[str, list[int]],
                  abnormal: dict[str, list[int]], decoys: dict[str, list[int]] = DECOYS) -> Planted:
    """Plant into the ResNet encoder at module path ``encoder`` ('' for the model itself)."""
    pre = encoder + "." if encoder else ""
    dead = {pre + k: v for k, v in dead.items()}
    abnormal = {pre + k: v for k, v in abnormal.items()}
    _set(model, dead, DEAD_GAMMA, DEAD_BETA)
    _set(model, abnormal, TINY_GAMMA, TINY_BETA)
    _set(model, {pre + k: v for k, v in decoys.items()}, DEAD_GAMMA, DEAD_BETA)
    return Planted(dead, abnormal)


def planted_encoder(seed: int = 0) -> tuple[nn.Module, Planted]:
    """A single ResNet-18 (width 8, RGB) with the audio plan planted; eval mode."""
    torch.manual_seed(seed)
    model = resnet18(in_channels=3, width=WIDTH)
    realistic_bn(model, seed)
    planted = plant_encoder(model, "", AUDIO_DEAD, AUDIO_ABNORMAL)
    planted.dead_by_modality = {"model": _count(AUDIO_DEAD)}
    return model.eval(), planted


def planted_av(model: nn.Module, audio: str, visual: str, seed: int = 0) -> Planted:
    """Plant different channels into the audio and visual encoders of an AV model."""
    realistic_bn(model, seed)
    a = plant_encoder(model, audio, AUDIO_DEAD, AUDIO_ABNORMAL)
    v = plant_encoder(model, visual, VISUAL_DEAD, VISUAL_ABNORMAL)
    model.eval()
    return Planted({**a.dead, **v.dead}, {**a.abnormal, **v.abnormal},
                   {"audio": _count(AUDIO_DEAD), "visual": _count(VISUAL_DEAD)})


def _count(plan: dict[str, list[int]]) -> int:
    return sum(len(v) for v in plan.values())


def state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A detached, cloned state dict, every key given ``prefix`` (e.g. 'module.')."""
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


# --- reading reports --------------------------------------------------------------------


def channels_by_layer(report: dict[str, Any], key: str = "dead_channels") -> dict[str, list[int]]:
    """{layer name: channels} for the layers where ``key`` is not empty."""
    return {layer["name"]: layer[key] for layer in report["layers"] if layer[key]}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

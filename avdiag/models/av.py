"""What the research audio-visual classifiers (``avdiag/models/arch/``) share.

Every one has a ResNet-18 audio encoder (1 input channel, spectrogram ``(B, 1, F, T)``; a 3-D
``(B, F, T)`` input is given the channel axis) and a ResNet-18 visual encoder (3 channels, clip
``(B, 3, T, H, W)``, the ``T`` frames folded into the batch and the features averaged over
``(T, h, w)``), a linear class head, and a key layout that matches the checkpoints of its training
code (before any ``module.`` prefix that ``nn.DataParallel`` adds). ``d`` below is the feature size,
``8 * width`` (512 for the real ``width=64``). :class:`TwoStreamFamily` reads such a checkpoint's
spec from its tensor shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from avdiag.models.registry import Architecture, ArchSpec, out_features
from avdiag.models.resnet import ResNetEncoder, resnet18, shape_from_tensors

if TYPE_CHECKING:
    from avdiag.load.store import TensorStore


def encoder_pair(width: int) -> tuple[ResNetEncoder, ResNetEncoder]:
    """The (audio, visual) ResNet-18 pair that every research classifier uses."""
    return resnet18(in_channels=1, width=width), resnet18(in_channels=3, width=width)


def audio_features(net: ResNetEncoder, audio: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, T) or (B, F, T) spectrogram -> (B, d)."""
    if audio.dim() == 3:
        audio = audio.unsqueeze(1)
    return net.pool(net(audio))


def visual_features(net: ResNetEncoder, visual: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) clip -> (B*T, 3, H, W) frames -> (B, d), pooled over (T, h, w)."""
    if visual.dim() != 5:
        raise ValueError(f"expected a 5-D (B, C, T, H, W) clip, got shape {tuple(visual.shape)}")
    b, c, t, h, w = visual.shape
    frames = visual.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return net.pool(net(frames), frames=t)


# --- OGM-GE fusion heads ---------------------------------------------------------


class ConcatFusion(nn.Module):
    """``fc_out(cat(a, v))``, audio first."""

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.fc_out = nn.Linear(2 * d, n_classes)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.cat((a, v), dim=1))


class SumFusion(nn.Module):
    """``fc_x(a) + fc_y(v)``."""

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.fc_x = nn.Linear(d, n_classes)
        self.fc_y = nn.Linear(d, n_classes)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fc_x(a) + self.fc_y(v)


class FiLMFusion(nn.Module):
    """FiLM: ``fc(a)`` gives (gamma, beta); ``fc_out(gamma * v + beta)``."""

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.d = d
        self.fc = nn.Linear(d, 2 * d)
        self.fc_out = nn.Linear(d, n_classes)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gamma, beta = torch.split(self.fc(a), self.d, dim=1)
        return self.fc_out(gamma * v + beta)


class GatedFusion(nn.Module):
    """Gated: ``fc_out(sigmoid(fc_x(a)) * fc_y(v))``."""

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.fc_x = nn.Linear(d, d)
        self.fc_y = nn.Linear(d, d)
        self.fc_out = nn.Linear(d, n_classes)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.sigmoid(self.fc_x(a)) * self.fc_y(v))


FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}


# --- the family base -------------------------------------------------------------


class TwoStreamFamily(Architecture):
    """A research classifier: two ResNet encoders and a linear class head, fused by concatenation
    unless the family says otherwise. ``build`` makes ``model(n_classes, width=...)``."""

    fusion = "concat"
    encoder: ClassVar[str] = ""  # name prefix of one encoder: its stem and blocks give width and depth
    class_head: ClassVar[str | None] = None  # the linear layer whose out_features is the class count
    model: ClassVar[type[nn.Module]]

    def head_for(self, fusion: str | None) -> str | None:
        return self.class_head

    def spec(self, store: TensorStore, fusion: str | None) -> ArchSpec | None:
        shape = shape_from_tensors(store, self.encoder)
        n_classes = out_features(store, self.head_for(fusion))
        if shape is None or n_classes is None:
            return None
        width, depth, _ = shape
        return ArchSpec(self.name, n_classes, width, depth, fusion=fusion)

    def build(self, spec: ArchSpec) -> nn.Module:
        return self.model(spec.n_classes, width=spec.width)

"""Audio-visual classifiers with the checkpoint key layouts of the research codebases.

Only the module names matter here: a ``state_dict`` of each class has the same
keys as a checkpoint saved by the corresponding training code (before any
``module.`` prefix that ``nn.DataParallel`` adds).  Every model has a ResNet-18
audio encoder (1 input channel, spectrogram ``(B, 1, F, T)``; a 3-D ``(B, F, T)``
input is given the channel axis) and a ResNet-18 visual encoder (3 channels,
clip ``(B, 3, T, H, W)``, the ``T`` frames folded into the batch and the
features averaged over ``(T, h, w)``).  ``d`` below is the feature size,
``8 * width`` (512 for the real ``width=64``).
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import ResNetEncoder, resnet18


def _encoders(width: int) -> tuple[ResNetEncoder, ResNetEncoder]:
    """The (audio, visual) ResNet-18 pair that every model here uses."""
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


_FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}


# --- classifiers ---------------------------------------------------------------


class OGMGEClassifier(nn.Module):
    """OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient
    Modulation", CVPR 2022).

    Keys: ``audio_net.*``, ``visual_net.*``, ``fusion_module.*`` where the fusion is
    ``concat`` -> ``fc_out`` (2d->n, audio first); ``sum`` -> ``fc_x`` (audio),
    ``fc_y`` (visual), d->n each; ``film`` -> ``fc`` (d->2d, audio modulates
    visual) + ``fc_out`` (d->n); ``gated`` -> ``fc_x``, ``fc_y`` (d->d) +
    ``fc_out`` (d->n), the audio branch gating the visual one.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, fusion: str = "concat", width: int = 64):
        super().__init__()
        if fusion not in _FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(_FUSIONS)}, got {fusion!r}")
        self.fusion = fusion
        self.audio_net, self.visual_net = _encoders(width)
        self.fusion_module = _FUSIONS[fusion](self.audio_net.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.audio_net, audio)
        v = visual_features(self.visual_net, visual)
        return a, v, self.fusion_module(a, v)


class LegacyOGMClassifier(nn.Module):
    """The earlier OGM-GE release layout (Peng et al., CVPR 2022): encoders ``parta``
    (audio) and ``partv`` (visual), head ``fc_`` (2d->n) on ``cat(v, a)``, VISUAL first.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.parta, self.partv = _encoders(width)
        self.fc_ = nn.Linear(2 * self.parta.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.parta, audio)
        v = visual_features(self.partv, visual)
        return a, v, self.fc_(torch.cat((v, a), dim=1))


class JournalOPMClassifier(nn.Module):
    """OPM / OGM journal version (Wei et al., "On-the-fly Modulation for Balanced
    Multimodal Learning", TPAMI 2024): ``encoder_1`` (audio), ``encoder_2`` (visual),
    head ``fusion_model.fxy`` (2d->n), audio first.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.encoder_1, self.encoder_2 = _encoders(width)
        self.fusion_model = nn.Module()
        self.fusion_model.fxy = nn.Linear(2 * self.encoder_1.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.encoder_1, audio)
        v = visual_features(self.encoder_2, visual)
        return a, v, self.fusion_model.fxy(torch.cat((a, v), dim=1))


class MMParetoClassifier(nn.Module):
    """MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent
    Unimodal Assistance", ICML 2024); the same layout is used by Diagnosing &
    Re-learning (Wei et al., ECCV 2024).

    Keys: ``audio_net``, ``visual_net``, ``head`` (2d->n, audio first), and the
    uni-modal heads ``head_audio``, ``head_video`` (d->n).
    ``forward(audio, visual)`` returns ``(logits, audio_logits, visual_logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.audio_net, self.visual_net = _encoders(width)
        d = self.audio_net.out_dim
        self.head = nn.Linear(2 * d, n_classes)
        self.head_audio = nn.Linear(d, n_classes)
        self.head_video = nn.Linear(d, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.audio_net, audio)
        v = visual_features(self.visual_net, visual)
        return self.head(torch.cat((a, v), dim=1)), self.head_audio(a), self.head_video(v)


class CRMTClassifier(nn.Module):
    """CRMT (Yang et al., "Quantifying and Enhancing Multi-modal Robustness with
    Modality Preference", ICLR 2024).

    Keys: ``audio_net``, ``visual_net``, ``fusion_module.orth_layer.fc`` (2d->n) on
    ``cat(v, a)``, VISUAL first, and the per-modality heads
    ``fusion_module.orth_layer.a_0`` (visual, d->n) and ``a_1`` (audio, d->n).
    ``forward(audio, visual)`` returns ``(logits, audio_logits, visual_logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        self.audio_net, self.visual_net = _encoders(width)
        d = self.audio_net.out_dim
        orth = nn.Module()
        orth.fc = nn.Linear(2 * d, n_classes)
        orth.a_0 = nn.Linear(d, n_classes)
        orth.a_1 = nn.Linear(d, n_classes)
        self.fusion_module = nn.Module()
        self.fusion_module.orth_layer = orth

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.audio_net, audio)
        v = visual_features(self.visual_net, visual)
        orth = self.fusion_module.orth_layer
        return orth.fc(torch.cat((v, a), dim=1)), orth.a_1(a), orth.a_0(v)


class BalanceMMClassifier(nn.Module):
    """BalanceMM toolkit layout: ``modality_encoder`` is an ``nn.ModuleDict`` with
    ``audio`` and ``visual`` encoders; head ``fusion_module.fc_out`` (2d->n), audio first.
    ``forward(audio, visual)`` returns ``(a_feat, v_feat, logits)``.
    """

    def __init__(self, n_classes: int, width: int = 64):
        super().__init__()
        audio, visual = _encoders(width)
        self.modality_encoder = nn.ModuleDict({"audio": audio, "visual": visual})
        self.fusion_module = ConcatFusion(audio.out_dim, n_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a = audio_features(self.modality_encoder["audio"], audio)
        v = visual_features(self.modality_encoder["visual"], visual)
        return a, v, self.fusion_module(a, v)

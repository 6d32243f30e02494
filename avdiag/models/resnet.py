"""A plain-torch ResNet encoder with torchvision's BasicBlock state_dict layout.

The key names match ``torchvision.models.resnet18/34`` exactly (``conv1``,
``bn1``, ``layer1..layer4.<i>.{conv1,bn1,conv2,bn2}``, ``layerN.0.downsample.{0,1}``),
minus ``fc``: the audio-visual codebases drop the classifier and average-pool the
last feature map themselves.  ``avgpool`` has no parameters, so leaving it out
changes no key; :meth:`ResNetEncoder.pool` does the pooling instead.

Channel widths are ``width, 2*width, 4*width, 8*width``; ``width=64`` is the
real ResNet-18/34.  Smaller widths give the same key set with small tensors,
which is what the tests and the bundled example use.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from avdiag.load.store import TensorStore

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    ``bn1`` feeds a ReLU directly; ``bn2`` feeds the residual addition, and the
    ReLU comes after the sum.  ``downsample`` (1x1 conv + BN) exists only where
    the stride or the channel count changes, as in torchvision.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                _conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet-18/34 trunk without ``avgpool``/``fc``.

    ``forward`` takes a 4-D ``(B, C, H, W)`` tensor and returns the last feature
    map ``(B, 8*width, H/32, W/32)`` (rounded up).  ``out_dim`` is ``8*width``.
    """

    def __init__(self, depth: int = 18, in_channels: int = 3, width: int = 64):
        super().__init__()
        if depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.depth = depth
        self.in_channels = in_channels
        self.width = width
        self.out_dim = 8 * width

        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_planes = width
        for stage, n_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
            planes = width * 2**stage
            first_stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(n_blocks):
                blocks.append(BasicBlock(in_planes, planes, first_stride if i == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's init: Kaiming-normal (fan_out, ReLU) convs, BN gamma=1 beta=0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expected a 4-D (B, C, H, W) input")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    @staticmethod
    def pool(fmap: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Average-pool a feature map to one vector per sample, as the AV models do.

        ``frames=None``: ``(B, C, h, w) -> (B, C)`` (adaptive average pool 2-D, used
        for the audio spectrogram).  ``frames=T``: the map comes from ``B*T`` frames
        folded into the batch; it is unfolded to ``(B, C, T, h, w)`` and pooled over
        ``(T, h, w)`` (adaptive average pool 3-D, used for the visual stream).
        """
        if frames is None:
            return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        bt, c, h, w = fmap.shape
        if bt % frames:
            raise ValueError(f"batch of {bt} feature maps is not a multiple of {frames} frames")
        fmap = fmap.reshape(bt // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)
        return torch.flatten(F.adaptive_avg_pool3d(fmap, 1), 1)


def resnet18(in_channels: int = 3, width: int = 64) -> ResNetEncoder:
    """ResNet-18 trunk (BasicBlock, 2-2-2-2)."""
    return ResNetEncoder(depth=18, in_channels=in_channels, width=width)


def resnet34(in_channels: int = 3, width: int = 64) -> ResNetEncoder:
    """ResNet-34 trunk (BasicBlock, 3-4-6-3)."""
    return ResNetEncoder(depth=34, in_channels=in_channels, width=width)


def shape_from_tensors(store: TensorStore, prefix: str = "") -> tuple[int, int, int] | None:
    """(width, depth, in_channels) of the BasicBlock ResNet-18/34 whose tensors sit under ``prefix``,
    or None when the tensors there are not one."""
    stem = prefix + "conv1.weight"
    if stem not in store or len(store.info(stem).shape) != 4:
        return None
    width, in_channels = store.info(stem).shape[:2]
    blocks = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{layer}\.(\d+)\.conv1\.weight$")
        blocks.append(len({m.group(1) for n in store.names() if (m := pattern.match(n))}))
    depth = next((d for d, stages in _BLOCKS_PER_STAGE.items() if stages == tuple(blocks)), None)
    if depth is None or any(n.startswith(prefix + "layer1.0.conv3") for n in store.names()):
        return None  # a Bottleneck ResNet (conv3) or another block count
    return width, depth, in_channels

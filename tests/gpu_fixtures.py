"""Model factories for the GPU-path tests (``--model gpu_fixtures:<name>``): a small conv -> BN ->
ReLU image model, the same model failing the way an exhausted allocator fails, and one that runs its
BN in bfloat16."""

from __future__ import annotations

import torch
from torch import nn

CHANNELS = 4


class ConvBN(nn.Module):
    """conv (3 -> 4, 3x3) -> BN -> ReLU over (B, 3, H, W) images."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False, dtype=dtype)
        self.bn = nn.BatchNorm2d(CHANNELS, dtype=dtype)
        self.relu = nn.ReLU()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(image.to(self.conv.weight.dtype))))


class RaisesOnForward(ConvBN):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        raise self.error


def conv_bn() -> nn.Module:
    return ConvBN()


def conv_bn_bf16() -> nn.Module:
    return ConvBN(torch.bfloat16)


def gpu_oom() -> nn.Module:
    return RaisesOnForward(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; "
                                                  "79.15 GiB total capacity)"))


def host_oom() -> nn.Module:
    return RaisesOnForward(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
                                        "allocate memory: you tried to allocate 68719476736 bytes."))


def shape_error() -> nn.Module:
    return RaisesOnForward(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))

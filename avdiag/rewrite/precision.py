"""Mixed precision for the forward passes a rewrite runs, as the activation probe does it: autocast on
CUDA when asked for, full precision everywhere else."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """``torch.autocast`` for ``device`` when ``amp`` is set and the device is a GPU, else a no-op."""
    return torch.autocast(device.type) if amp and device.type == "cuda" else nullcontext()

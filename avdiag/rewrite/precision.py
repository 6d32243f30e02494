"""Mixed precision for the forward passes a rewrite runs, as the activation probe does it: autocast on
CUDA when asked for (bfloat16 where the GPU supports it, else float16), full precision everywhere
else. See :mod:`avdiag.measure.precision`."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from avdiag.measure import precision


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """Autocast for ``device`` when ``amp`` is set and the device is a GPU, else a no-op."""
    return precision.autocast(device, amp)

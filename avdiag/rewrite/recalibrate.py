"""BN recalibration: re-estimate running statistics on target data (the cross-modal case: an
encoder pre-trained on one modality keeps the other modality's statistics)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from avdiag.locate.resolve import ResolvedModel
from avdiag.measure.precision import full_fp32
from avdiag.rewrite.precision import autocast


def recalibrate(resolved: ResolvedModel, layer_names: set[str], batches: Iterable[dict],
                device: torch.device, amp: bool = False,
                tf32: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running (mean, var) of the BN layers in ``layer_names`` re-estimated over ``batches``.

    Those layers run in training mode with a cumulative average (momentum None), everything else
    in eval mode, without gradients; the model's own state is restored afterwards. ``amp``: forward
    passes under autocast on CUDA (the statistics themselves accumulate in the layers' own dtype).
    ``tf32``: allow TF32 on CUDA (default: full float32 while measuring).
    """
    model = resolved.to(device).eval()
    targets = {resolved.name_prefix + n: m for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and resolved.name_prefix + n in layer_names}
    saved = {n: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for n, m in targets.items()}
    try:
        for m in targets.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad(), full_fp32(device, enabled=not tf32), autocast(device, amp):
            for batch in batches:
                resolved({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return {n: (m.running_mean.detach().cpu().clone(), m.running_var.detach().cpu().clone())
                for n, m in targets.items()}
    finally:
        for n, m in targets.items():
            momentum, mean, var, tracked = saved[n]
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
            m.eval()

"""The independent reference for gradient-conflict cosines: no code shared with the engine.

Per sample, one forward through the model's parts and ``torch.autograd.grad`` of the fused and the
uni-modal loss over the encoder's parameters; the flattened gradients' cosine in float64. It runs in
the dtype of the model and the batch (float32, or float64 for the float64 measurement's tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avdiag.models.parts import AVParts


def ref_cosines(parts: AVParts, batch: dict) -> list[tuple[float, float]]:
    """(cos_audio, cos_visual) per sample from batch-size-1 backward passes, eval mode."""
    rows = []
    for i in range(len(batch["label"])):
        sample = {k: batch[k][i:i + 1] for k in ("audio", "visual", "label")}
        cos = ref_batch_cos(parts, sample)
        rows.append((cos["audio"], cos["visual"]))
    return rows


def ref_batch_cos(parts: AVParts, batch: dict) -> dict[str, float]:
    """Per modality, the cosine between the encoder gradients of the fused and the uni-modal
    batch-mean cross-entropy, eval mode."""
    parts.model.eval()
    feats = parts.features(batch)
    y = batch["label"]
    fused = parts.fuse(feats["audio"], feats["visual"])
    uni = parts.unimodal(feats["audio"], feats["visual"])
    out = {}
    for m in ("audio", "visual"):
        params = list(parts.encoders[m].parameters())
        g1 = torch.autograd.grad(F.cross_entropy(fused, y), params, retain_graph=True)
        g2 = torch.autograd.grad(F.cross_entropy(uni[m], y), params, retain_graph=True)
        v1 = torch.cat([g.reshape(-1) for g in g1]).double()
        v2 = torch.cat([g.reshape(-1) for g in g2]).double()
        out[m] = float(v1 @ v2 / (v1.norm() * v2.norm()))
    return out

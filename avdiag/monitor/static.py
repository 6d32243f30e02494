"""The static dead-channel scan of `avdiag inspect`, on the live model's weights (no file written).

The BatchNorm layers are located as in a checkpoint (:func:`avdiag.locate.locate` over the model's
state dict), each assigned to the modality of the encoder module it sits in, and judged by
:func:`avdiag.measure.static.judge` with the same thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from avdiag.load import Checkpoint, TensorStore
from avdiag.locate import Located, locate
from avdiag.measure.integrity import filter_norms
from avdiag.measure.static import channel_stats, judge
from avdiag.measure.thresholds import Thresholds
from avdiag.models.parts import AVParts


def encoder_prefixes(parts: AVParts) -> dict[str, str]:
    """modality -> qualified name prefix (with the trailing dot) of its encoder in ``parts.model``."""
    names = {id(mod): name for name, mod in parts.model.named_modules()}
    return {m: names[id(enc)] + "." for m, enc in parts.encoders.items() if names.get(id(enc))}


class DeadChannelScan:
    """Scans one model repeatedly; the layers are located once (the names never change in training)."""

    def __init__(self, parts: AVParts, thresholds: Thresholds | None = None):
        self.model: nn.Module = parts.model
        self.thresholds = thresholds or Thresholds()
        self.prefixes = encoder_prefixes(parts)
        self._located: Located | None = None

    def _locate(self, state: dict[str, torch.Tensor]) -> Located:
        if self._located is None:
            ckpt = Checkpoint(Path("<live model>"), "state_dict", TensorStore.from_mapping(state))
            self._located = locate(ckpt, modality_overrides=self.prefixes or None)
        return self._located

    def counts(self) -> dict[str, dict[str, int]]:
        """Per modality: ``dead`` channels, ``channels`` in its BatchNorm layers, ``layers``."""
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        out: dict[str, dict[str, int]] = {}
        for layer in self._locate(state).layers:
            values = {name: state[name].to(torch.float64).cpu().numpy().reshape(-1) for name in layer.params.values()}
            conv = state.get(layer.conv + ".weight") if layer.conv else None
            conv = conv.cpu() if conv is not None else None
            norms = filter_norms(conv) if conv is not None and conv.dim() >= 2 else None
            verdict = judge(layer, channel_stats(layer, values, norms), self.thresholds)
            entry = out.setdefault(layer.modality or "unassigned", {"dead": 0, "channels": 0, "layers": 0})
            entry["dead"] += len(verdict.dead)
            entry["channels"] += layer.channels
            entry["layers"] += 1
        return out


def dead_fraction(entry: dict[str, int]) -> float:
    return entry["dead"] / entry["channels"] if entry["channels"] else float(np.nan)

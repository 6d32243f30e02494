"""The pooled features of the loop's own forward pass, caught by forward hooks on the encoders.

The built-in classifiers pool each encoder's feature map as :func:`avdiag.models.av.audio_features`
and :func:`~avdiag.models.av.visual_features` do (the audio map average-pooled over (h, w); the
visual map, frames folded into the batch, over (T, h, w)); the same pooling here gives bit for bit
the features the model's head saw, so the monitor needs no extra forward. An encoder that already
returns ``(B, d)`` is taken as it is.
"""

from __future__ import annotations

import torch

from avdiag.errors import UsageError
from avdiag.models.parts import AVParts
from avdiag.models.resnet import ResNetEncoder


class FeatureTap:
    """Keeps the last output of each encoder (detached) while ``enabled``."""

    def __init__(self, parts: AVParts):
        self.outputs: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._handles = [enc.register_forward_hook(self._keeper(m)) for m, enc in parts.encoders.items()]

    def _keeper(self, modality: str):
        def keep(_module, _inputs, output) -> None:
            if self.enabled and isinstance(output, torch.Tensor):
                self.outputs[modality] = output.detach()
        return keep

    def take(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The pooled features of the last forward (then forgotten), or UsageError when there was none."""
        missing = [m for m in ("audio", "visual") if m not in self.outputs]
        if missing:
            raise UsageError("monitor.step: no forward pass of the model since the last step (call it after the "
                             "loop's forward and backward, before optimizer.step())")
        feats = {m: pooled(self.outputs[m], m, batch_size) for m in ("audio", "visual")}
        self.outputs.clear()
        return feats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def pooled(output: torch.Tensor, modality: str, batch_size: int) -> torch.Tensor:
    if output.dim() == 2:
        return output
    if output.dim() != 4:
        raise UsageError(f"monitor: the {modality} encoder returned a {output.dim()}-D tensor; expected a "
                         "(B, d) feature or a (B, C, h, w) map")
    if modality == "audio":
        return ResNetEncoder.pool(output)
    if output.shape[0] % batch_size:
        raise UsageError(f"monitor: the visual encoder saw {output.shape[0]} frames for a batch of {batch_size}")
    return ResNetEncoder.pool(output, frames=output.shape[0] // batch_size)

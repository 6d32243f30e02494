"""Running the model over batches for the contribution measures: eval mode under
``torch.inference_mode`` (no gradients, BatchNorm on its running statistics), every module's own
train/eval flag restored afterwards, in full float32 (TF32 off unless ``tf32=True``). The encoders
run once per batch; each measure's *collector* then takes what it needs from the batch and its
pooled features, keeping its per-batch results on the device until the end (no per-batch host
synchronisation: batches are copied with ``non_blocking``, which overlaps with compute when the
loader pins memory)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from avdiag.errors import DataError
from avdiag.locate.resolve import move_module, out_of_memory_as_error
from avdiag.measure.precision import full_fp32
from avdiag.models.parts import AVParts

MODALITIES = ("audio", "visual")


class Collector(Protocol):
    """One measure's share of a pass: ``add`` is called once per batch, inside the pass."""

    def add(self, parts: AVParts, batch: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
            index: torch.Tensor) -> None: ...


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode; every module's own train/eval flag is restored afterwards (a
    model already in eval mode is left alone: ``eval()`` walks every submodule)."""
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m in training:
            m.training = True


def device_of(parts: AVParts) -> torch.device:
    p = next(parts.model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` on ``device``; a batch without audio, visual or label is refused."""
    missing = [k for k in (*MODALITIES, "label") if k not in batch]
    if missing:
        raise DataError(f"contribution needs audio, visual and label in every batch; missing {missing}")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def batch_index(batch: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """The batch's dataset indices, or positions counted from ``start`` when it carries none."""
    n = batch["label"].shape[0]
    if "index" in batch:
        return batch["index"].reshape(n).long()
    return torch.arange(start, start + n, device=batch["label"].device)


def run(parts: AVParts, batches: Iterable[dict], device: torch.device | str, collectors: Sequence[Collector],
        empty: str = "no batches to measure", *, tf32: bool = False) -> int:
    """Move the model to ``device`` and feed every batch, with its pooled features, to each collector;
    the number of samples. ValueError(``empty``) when there is no batch; running out of memory is a
    one-line ModelError. ``tf32``: allow TF32 matmuls and convolutions (off: full float32)."""
    device = torch.device(device)
    seen = 0
    with out_of_memory_as_error():
        move_module(parts.model, device)
        with evaluating(parts.model), full_fp32(device, enabled=not tf32):
            for raw in batches:
                batch = to_device(raw, device)
                index = batch_index(batch, seen)
                seen += int(index.shape[0])
                feats = parts.features(batch)
                for collector in collectors:
                    collector.add(parts, batch, feats, index)
    if not seen:
        raise ValueError(empty)
    return seen

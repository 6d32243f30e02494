"""`avdiag conflict`: per-modality gradient conflict (MMPareto) and modality contribution (Shapley, OGM-GE,
OPM, learning state) of a checkpoint's model on data.

Runs on one process or sharded over a torchrun group: batches are dealt round-robin to ranks, every
rank measures its share, and the partial results are gathered to rank 0 over a CPU (gloo) group and
combined exactly, so the numbers equal a single-process run up to float summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avdiag.errors import ModelError
from avdiag.measure.conflict import GradientConflict, measure_conflict
from avdiag.measure.contribution import OGM_ALPHA, Contribution, ContributionPartial, contribution_partial
from avdiag.models.parts import av_parts
from avdiag.progress import ProgressFactory, no_progress
from avdiag.results import CheckpointRef, envelope
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.subject import LoadOptions, Subject


@dataclass
class ConflictResult:
    """What `avdiag conflict` found. ``to_dict()`` is the JSON report; ``to_frame()`` one row a sample."""

    checkpoint: CheckpointRef
    model: str
    data: str
    device: str
    world_size: int
    conflict: GradientConflict
    contribution: Contribution
    options: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        parts = []
        for m, s in self.conflict.summaries.items():
            c = self.contribution.modalities.get(m)
            contribution = (f", shapley {c.shapley_mean_accuracy:.3f}, uni-modal acc {c.unimodal_accuracy:.3f}"
                            if c else "")
            parts.append(f"{m}: cos {s.cos_mean:+.3f} (conflict {s.conflict_rate:.0%}){contribution}")
        return "; ".join(parts) + f"; OGM-GE dominant: {self.contribution.ogm.dominant or 'none'}"

    def summary(self) -> dict[str, Any]:
        return {"text": self.summary_line(), "dominant": self.contribution.ogm.dominant,
                "fused_accuracy": self.contribution.fused_accuracy,
                "cos_mean": {m: s.cos_mean for m, s in self.conflict.summaries.items()},
                "conflict_rate": {m: s.conflict_rate for m, s in self.conflict.summaries.items()}}

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        contribution = self.contribution.to_dict(samples=samples)
        modalities = {}
        for m, s in self.conflict.summaries.items():
            c = contribution["modalities"].get(m, {})
            modalities[m] = {"conflict": s.to_dict(),
                             "contribution": {k: v for k, v in c.items() if k != "ogm"},
                             "ogm": c.get("ogm", {})}
        return envelope("conflict", [self.checkpoint], self.summary(), {
            "checkpoint": self.checkpoint.to_dict(), "model": self.model, "data": self.data, "device": self.device,
            "world_size": self.world_size, "options": self.options, "modalities": modalities,
            "ogm": contribution["ogm"], "opm": contribution["opm"],
            "conflict": self.conflict.to_dict(), "contribution": contribution})

    def to_frame(self):
        """Per-sample conflict cosines and Shapley values, one row per dataset index."""
        conflict = self.conflict.to_frame()
        contribution = self.contribution.to_frame()
        if conflict is None or len(conflict) == 0:
            return contribution
        keys = [c for c in ("index", "label") if c in conflict and c in contribution]
        return conflict.merge(contribution, on=keys, how="outer")


def conflict(checkpoint: str | Path | Subject, data: DataSource, *, ogm_alpha: float = OGM_ALPHA,
             per_sample: bool = True, heldout_split: str | None = "test", train_mode: bool = False,
             load: LoadOptions | None = None, progress: ProgressFactory = no_progress) -> ConflictResult | None:
    """Gradient conflict and modality contribution of ``checkpoint``'s model on ``data``.

    ``heldout_split`` feeds the learning state (k-means purity gap; None skips it). ``train_mode``:
    per-batch gradients with BatchNorm in train mode, as in a training step. Under torchrun every rank
    must call this; rank 0 gets the combined result, the other ranks None.
    """
    subject = Subject.of(checkpoint, load)
    resolved = subject.model_for(data)
    try:
        parts = av_parts(resolved.module)
    except TypeError as e:
        raise ModelError(f"{subject.path}: conflict analysis needs a built-in audio-visual classifier ({e})") from e
    rank, world, owned = _join_group()
    try:
        device = _rank_device(data.torch_device(), rank, world)
        mine = _my_batches(data.loader(), rank, world, data.n_samples(), progress)
        heldout = None
        if heldout_split and data.has_split(heldout_split):
            heldout = _my_batches(data.loader(heldout_split), rank, world, data.n_samples(heldout_split), progress,
                                  label="held-out")
        measured = measure_conflict(parts, mine, device, per_sample=per_sample, train_mode=train_mode)
        partial = contribution_partial(parts, mine, device, heldout_batches=heldout or None)
        if world > 1:
            gathered = _gather_to_root((measured.to_dict(), partial.to_dict()), rank, world)
            if rank != 0:
                return None
            measured = GradientConflict.combine([GradientConflict.from_dict(c) for c, _ in gathered])
            partial = ContributionPartial.combine([ContributionPartial.from_dict(p) for _, p in gathered])
    finally:
        if owned:
            _leave_group()
    return ConflictResult(
        checkpoint=subject.ref(), model=resolved.source, data=data.name, device=str(device), world_size=world,
        conflict=measured, contribution=partial.result(ogm_alpha, seed=data.seed),
        options={"ogm_alpha": ogm_alpha, "per_sample": per_sample, "batch_size": data.batch_size,
                 "limit": data.limit, "seed": data.seed, "split": data.split, "heldout_split": heldout_split,
                 "train_mode": train_mode})


def _my_batches(loader, rank: int, world: int, total: int, progress: ProgressFactory, label: str = "conflict"):
    out = []
    with progress(total, label) as advance:
        for i, batch in enumerate(loader):
            if i % world == rank:
                out.append(batch)
            advance(len(batch["label"]))
    return out


def _join_group() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the group). The group only carries Python
    objects (the partial results), so it is a CPU (gloo) group whatever device the measures run on."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), owned


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_device(device, rank: int, world: int):
    import torch

    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _gather_to_root(obj: Any, rank: int, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []

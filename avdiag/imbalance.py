"""`analyse_imbalance`: load -> resolve the AV model -> gradient conflict and modality contribution
on data, on one process or sharded over a torchrun group (batches dealt round-robin to ranks; the
per-batch and per-sample results are gathered to rank 0 and combined, so the numbers equal a
single-process run up to float summation order)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avdiag._version import __version__
from avdiag.inspection import ProbeOptions, pick_device
from avdiag.load import load_checkpoint
from avdiag.locate import locate
from avdiag.locate.resolve import ModelError, resolve_model
from avdiag.measure.conflict import ConflictResult, measure_conflict
from avdiag.measure.contribution import ContributionPartial, ContributionResult, contribution_partial
from avdiag.models.parts import av_parts

SCHEMA_VERSION = "1.0"


@dataclass
class ImbalanceOptions:
    data: ProbeOptions  # data, model, device, split, batch size, limit, seed
    ogm_alpha: float = 0.8
    per_sample: bool = True
    heldout_split: str | None = "test"  # learning state; None skips it
    train_mode: bool = False  # per-batch gradients with BatchNorm in train mode


@dataclass
class ImbalanceResult:
    checkpoint: dict[str, Any]
    model: str
    data: str
    device: str
    world_size: int
    conflict: ConflictResult
    contribution: ContributionResult
    options: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        parts = []
        for m, s in self.conflict.summaries.items():
            c = self.contribution.modalities.get(m)
            contribution = (f", shapley {c.shapley_mean_accuracy:.3f}, uni-modal acc {c.unimodal_accuracy:.3f}"
                            if c else "")
            parts.append(f"{m}: cos {s.cos_mean:+.3f} (conflict {s.conflict_rate:.0%}){contribution}")
        return "; ".join(parts) + f"; OGM-GE dominant: {self.contribution.ogm.dominant or 'none'}"

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        contribution = self.contribution.to_dict(samples=samples)
        modalities = {}
        for m, s in self.conflict.summaries.items():
            c = contribution["modalities"].get(m, {})
            modalities[m] = {"conflict": s.to_dict(),
                             "contribution": {k: v for k, v in c.items() if k != "ogm"},
                             "ogm": c.get("ogm", {})}
        return {"schema_version": SCHEMA_VERSION,
                "tool": {"name": "avdiag", "version": __version__, "command": "conflict"},
                "checkpoint": self.checkpoint, "model": self.model, "data": self.data, "device": self.device,
                "world_size": self.world_size, "options": self.options, "modalities": modalities,
                "ogm": contribution["ogm"], "opm": contribution["opm"],
                "conflict": self.conflict.to_dict(), "contribution": contribution, "summary": self.summary_line()}

    def samples_frame(self):
        """Per-sample conflict cosines and Shapley values, one row per dataset index."""
        conflict = self.conflict.samples_frame()
        contribution = self.contribution.samples_frame()
        if conflict is None or len(conflict) == 0:
            return contribution
        return conflict.merge(contribution, on=[c for c in ("index", "label") if c in conflict and c in contribution],
                              how="outer")


def analyse_imbalance(path: str | Path, options: ImbalanceOptions, *, allow_globals: tuple[str, ...] = (),
                      unsafe: bool = False) -> ImbalanceResult | None:
    """Conflict and contribution of ``path`` on data. Under torchrun, every rank must call this; rank 0
    gets the combined result, the other ranks None."""
    from avdiag.data import DataOptions, make_loader, open_dataset

    ckpt = load_checkpoint(path, allow_globals=allow_globals, unsafe=unsafe)
    located = locate(ckpt)
    d = options.data
    resolved = resolve_model(ckpt, located.layout, d.model)
    try:
        parts = av_parts(resolved.module)
    except TypeError as e:
        raise ModelError(f"{ckpt.path}: conflict analysis needs a built-in audio-visual classifier ({e})") from e
    rank, world = _distributed()
    device = _rank_device(pick_device(d.device), rank, world)
    dataset = d.data if not isinstance(d.data, str) else open_dataset(d.data, split=d.split,
                                                                       options=d.data_options or DataOptions())
    loader = make_loader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, limit=d.limit, seed=d.seed)
    mine = [b for i, b in enumerate(loader) if i % world == rank]
    heldout = None
    if options.heldout_split:
        held_ds = open_dataset(d.data, split=options.heldout_split, options=d.data_options or DataOptions()) \
            if isinstance(d.data, str) else None
        if held_ds is not None:
            held = make_loader(held_ds, batch_size=d.batch_size, limit=d.limit, seed=d.seed)
            heldout = [b for i, b in enumerate(held) if i % world == rank]
    conflict = measure_conflict(parts, mine, device, per_sample=options.per_sample, train_mode=options.train_mode)
    partial = contribution_partial(parts, mine, device, heldout_batches=heldout or None)
    if world > 1:
        gathered = _gather((conflict.to_dict(), partial.to_dict()), rank, world)
        if rank != 0:
            return None
        conflict = ConflictResult.combine([ConflictResult.from_dict(c) for c, _ in gathered])
        partial = ContributionPartial.combine([ContributionPartial.from_dict(p) for _, p in gathered])
    contribution = partial.result(options.ogm_alpha, seed=d.seed)
    return ImbalanceResult(
        checkpoint={"path": str(ckpt.path), "format": ckpt.format}, model=resolved.source,
        data=getattr(dataset, "name", str(d.data)), device=str(device), world_size=world,
        conflict=conflict, contribution=contribution,
        options={"ogm_alpha": options.ogm_alpha, "per_sample": options.per_sample, "batch_size": d.batch_size,
                 "limit": d.limit, "seed": d.seed, "split": d.split, "heldout_split": options.heldout_split,
                 "train_mode": options.train_mode})


def _distributed() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, or torchrun's environment (initialised here)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _rank_device(device: torch.device, rank: int, world: int) -> torch.device:
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return device


def _gather(obj: Any, rank: int, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out

"""`avdiag conflict`: per-modality gradient conflict (MMPareto) and modality contribution (Shapley, OGM-GE,
OPM, learning state) of a checkpoint's model on data.

Streams the data once: each batch is measured for gradient conflict (in chunks under a memory
budget, see :mod:`avdiag.measure.conflict`) as it passes on to the contribution pass, so no more
than one decoded batch is held, and the progress counts samples measured.

Runs on one process or sharded over a torchrun group: batches are dealt round-robin to ranks (each
rank decodes only its own), every rank measures its share, and the partial results are gathered to
rank 0 over a CPU (gloo) group and combined exactly, so the numbers equal a single-process run up
to float summation order. A rank dealt no batch of a split (more processes than batches) still
takes part in the gather and sends nothing for that split.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from avdiag.errors import ModelError, UsageError
from avdiag.measure.conflict import ConflictMeter, GradientConflict, parse_memory
from avdiag.measure.contribution import (
    OGM_ALPHA, Contribution, ContributionPartial, PooledFeatures, contribution_partial,
)
from avdiag.measure.contribution.learning_state import FeatureCollector
from avdiag.measure.contribution.passes import run as run_passes
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
    data_report: dict[str, Any] = field(default_factory=dict)  # DataSource.report(): layout, skipped rows
    clips: dict[int, str] = field(default_factory=dict)  # dataset index -> clip name (empty: unnamed items)

    def clip(self, index: int) -> str | None:
        return self.clips.get(int(index))

    def summary_line(self) -> str:
        parts = []
        for m, s in self.conflict.summaries.items():
            c = self.contribution.modalities.get(m)
            contribution = (f", shapley {c.shapley_mean_accuracy:.3f}, uni-modal acc {c.unimodal_accuracy:.3f}"
                            if c else "")
            parts.append(f"{m}: cos {s.cos_mean:+.3f} (conflict {s.conflict_rate:.0%}){contribution}")
        line = "; ".join(parts) + f"; OGM-GE dominant: {self.contribution.ogm.dominant or 'none'}"
        sketch = self.conflict.sketch
        if sketch is not None:
            line += (f"; per-sample cosines approximate (sketch {sketch.dim} per layer, "
                     f"max error {sketch.max_abs_error:.3f} on {sketch.checked} checked)")
        return line

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
            "checkpoint": self.checkpoint.to_dict(), "model": self.model,
            "data": {"name": self.data, **self.data_report}, "device": self.device,
            "world_size": self.world_size, "options": self.options, "modalities": self._named(modalities),
            "ogm": contribution["ogm"], "opm": contribution["opm"],
            "conflict": self._named(self.conflict.to_dict()), "contribution": self._named(contribution)})

    def _named(self, value: Any) -> Any:
        """``value`` with a ``clip`` next to every per-sample ``index``: rows get a name, columns a column."""
        if not self.clips:
            return value
        if isinstance(value, list):
            return [self._named(v) for v in value]
        if not isinstance(value, dict):
            return value
        named = {k: self._named(v) for k, v in value.items()}
        index = value.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and "clip" not in value:
            named["clip"] = self.clip(index)
        elif isinstance(index, list) and "clip" not in value and all(isinstance(i, int) for i in index):
            named["clip"] = [self.clip(i) for i in index]
        return named

    def to_frame(self):
        """Per-sample conflict cosines and Shapley values, one row per dataset index (with its ``clip`` name
        when the data names its items)."""
        conflict = self.conflict.to_frame()
        frame = self.contribution.to_frame()
        if conflict is not None and len(conflict) > 0:
            keys = [c for c in ("index", "label") if c in conflict and c in frame]
            frame = conflict.merge(frame, on=keys, how="outer")
        if self.clips and "index" in frame:
            frame["clip"] = [self.clip(i) for i in frame["index"]]
        return frame


def conflict(checkpoint: str | Path | Subject, data: DataSource, *, ogm_alpha: float = OGM_ALPHA,
             per_sample: bool = True, heldout_split: str | None = "test", train_mode: bool = False,
             max_memory: int | str | None = None, sketch: int | None = None, load: LoadOptions | None = None,
             progress: ProgressFactory = no_progress) -> ConflictResult | None:
    """Gradient conflict and modality contribution of ``checkpoint``'s model on ``data``.

    ``heldout_split`` feeds the learning state (k-means purity gap; None skips it). ``train_mode``:
    per-batch gradients with BatchNorm in train mode, as in a training step. ``max_memory``: the
    memory budget of the gradient passes, bytes or a size such as ``"2G"`` (default 2 GiB on a CPU, half
    the free memory of a GPU). ``sketch``: approximate per-sample
    cosines from a random projection of that many numbers per layer (seeded with ``data.seed``; the
    result says so and states the error measured on the first samples); None: exact. ``data.amp``
    runs the passes under autocast on CUDA. Under torchrun every rank must call this, whatever share
    of the batches it is dealt (none included); rank 0 gets the combined result, the others None.
    """
    budget = None if max_memory is None else parse_memory(max_memory)  # None: the device's default
    if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, int) or sketch < 1):
        raise UsageError(f"--sketch: expected a positive number of dimensions per layer, got {sketch!r}")
    subject = Subject.of(checkpoint, load)
    resolved = subject.model_for(data)
    try:
        parts = av_parts(resolved.module)
    except TypeError as e:
        raise ModelError(f"{subject.path}: {e}; without --model, the built-in classifier is used "
                         "when the keys match") from e
    rank, world, owned = _join_group()
    try:
        device = _rank_device(data.torch_device(), rank, world)
        shown = progress if rank == 0 else no_progress
        meter = ConflictMeter(parts, device, per_sample, train_mode, memory_bytes=budget, sketch=sketch,
                              sketch_seed=data.seed, amp=data.amp, tf32=data.tf32)
        batches, n_mine = _shard(data, data.split, rank, world)
        partial = None
        with shown(n_mine, _label("conflict", rank, world)) as advance:
            if n_mine:
                partial = contribution_partial(parts, _measured(batches, meter, advance), device, tf32=data.tf32)
        heldout = None
        if heldout_split and data.has_split(heldout_split):
            heldout = _heldout_features(parts, data, heldout_split, rank, world, device, shown)
        shards = [(meter.result(), partial, heldout)]
        if world > 1:
            gathered = _gather_to_root(shards[0], rank, world)  # the partial results as they are: arrays, not lists
            skipped = _gather_to_root(data.skipped_rows(), rank, world)  # rows each rank found damaged when read
            if rank != 0:
                return None
            for rows in skipped:
                data.add_skipped(rows)
            shards = gathered
        measured = GradientConflict.combine([c for c, _, _ in shards])
        partial = _combine_contribution([p for _, p, _ in shards], [h for _, _, h in shards])
    finally:
        if owned:
            _leave_group()
    return ConflictResult(
        checkpoint=subject.ref(), model=resolved.source, data=data.name, device=str(device), world_size=world,
        conflict=measured, contribution=partial.result(ogm_alpha, seed=data.seed),
        data_report=data.report(), clips=data.clip_ids(),
        options={"ogm_alpha": ogm_alpha, "per_sample": per_sample, "batch_size": data.batch_size,
                 "limit": data.limit, "seed": data.seed, "split": data.split, "heldout_split": heldout_split,
                 "train_mode": train_mode, "max_memory": meter.engine.memory_bytes, "sketch": sketch,
                 "amp": data.amp, "tf32": data.tf32, "float64": data.float64})


def _label(what: str, rank: int, world: int) -> str:
    return what if world == 1 else f"{what} (rank 0 of {world})"


def _measured(batches: Iterable[dict], meter: ConflictMeter, advance) -> Iterator[dict]:
    """The batches, each measured for conflict as it passes on to the contribution pass: one read
    of the data feeds both measures."""
    for batch in batches:
        advance(meter.add(batch))
        yield batch


def _heldout_features(parts, data: DataSource, split: str, rank: int, world: int, device,
                      progress: ProgressFactory) -> PooledFeatures | None:
    """This rank's pooled features of the held-out split (None when it is dealt no batch of it)."""
    batches, n_mine = _shard(data, split, rank, world)
    if not n_mine:
        return None
    held = FeatureCollector()
    with progress(n_mine, _label("held-out", rank, world)) as advance:
        run_passes(parts, _counted(batches, advance), device, [held], empty="the held-out data has no batches",
                   tf32=data.tf32)
    return held.result()


def _counted(batches: Iterable[dict], advance) -> Iterator[dict]:
    for batch in batches:
        yield batch
        advance(len(batch["label"]))


def _combine_contribution(partials: list[ContributionPartial | None],
                          heldouts: list[PooledFeatures | None]) -> ContributionPartial:
    """The shards' contribution records together, the held-out features of every rank that had
    some attached (a rank dealt no batch of a split sends nothing for it)."""
    combined = ContributionPartial.combine([p for p in partials if p is not None])
    held = [h for h in heldouts if h is not None]
    return replace(combined, heldout=PooledFeatures.combine(held, "held-out shards") if held else None)


def _shard(data: DataSource, split: str, rank: int, world: int) -> tuple[Iterable[dict], int]:
    """The batches of ``split`` dealt to ``rank`` (round-robin: batch i goes to rank i mod world)
    and how many samples they hold. Only this rank's batches are decoded."""
    loader = data.loader(split)
    if world == 1:
        return loader, data.n_samples(split)
    if isinstance(loader, list):
        mine = loader[rank::world]
        return mine, sum(len(b["label"]) for b in mine)
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        mine = list(loader.batch_sampler)[rank::world]
        sub = type(loader)(loader.dataset, batch_sampler=mine, collate_fn=loader.collate_fn,
                           num_workers=loader.num_workers, pin_memory=loader.pin_memory)
        return sub, sum(len(b) for b in mine)
    n = data.n_samples(split)
    batch = data.batch_size
    n_batches = -(-n // batch)
    counts = [min(batch, n - i * batch) for i in range(rank, n_batches, world)]
    return (b for i, b in enumerate(loader) if i % world == rank), sum(counts)


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

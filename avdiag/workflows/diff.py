"""`avdiag diff A B`: what changed between two checkpoints, tensor by tensor and BN channel by channel
(the comparison itself is :mod:`avdiag.measure.compare`; both files are opened once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avdiag.errors import UsageError
from avdiag.measure.compare import (
    BNLayerDiff,
    ModalityDiff,
    TensorChange,
    compare_bn_layers,
    compare_modalities,
    compare_tensors,
    count_by,
    per_channel_names,
)
from avdiag.measure.thresholds import Thresholds
from avdiag.results import CheckpointRef, envelope
from avdiag.workflows.inspect import CheckpointSummary, InspectResult, scan
from avdiag.workflows.subject import LoadOptions, Subject


@dataclass
class DiffResult:
    """What `avdiag diff A B` found. ``to_dict()`` is the JSON report; ``to_frame()`` one row per changed tensor."""

    a: CheckpointSummary
    b: CheckpointSummary
    atol: float
    thresholds: Thresholds
    added: list[str]
    removed: list[str]
    changed: list[TensorChange]
    n_unchanged: int
    bn_layers: list[BNLayerDiff]
    modalities: dict[str, ModalityDiff]
    inspect_a: InspectResult = field(repr=False)
    inspect_b: InspectResult = field(repr=False)

    @property
    def identical_files(self) -> bool:
        return self.a.sha256 is not None and self.a.sha256 == self.b.sha256

    @property
    def identical_tensors(self) -> bool:
        return not (self.added or self.removed or self.changed)

    @property
    def n_dead_before(self) -> int:
        return self.inspect_a.n_dead

    @property
    def n_dead_after(self) -> int:
        return self.inspect_b.n_dead

    @property
    def n_died(self) -> int:
        return sum(len(layer.died) for layer in self.bn_layers)

    @property
    def n_revived(self) -> int:
        return sum(len(layer.revived) for layer in self.bn_layers)

    def summary_line(self) -> str:
        head = "identical files; " if self.identical_files else ""
        tensors = (f"{len(self.changed)} changed, {len(self.added)} added, {len(self.removed)} removed, "
                   f"{self.n_unchanged} unchanged tensors")
        per = ", ".join(f"{m.name} {m.n_dead_before}->{m.n_dead_after}" for m in self.modalities.values()
                        if m.n_bn_channels_before or m.n_bn_channels_after)
        return (f"{head}{tensors}; dead BN channels {self.n_dead_before} -> {self.n_dead_after} "
                f"({self.n_died} died, {self.n_revived} revived{'; ' + per if per else ''})")

    def summary(self) -> dict[str, Any]:
        return {"identical_files": self.identical_files, "identical_tensors": self.identical_tensors,
                "n_tensors_a": self.a.n_tensors, "n_tensors_b": self.b.n_tensors,
                "n_added": len(self.added), "n_removed": len(self.removed),
                "n_changed": len(self.changed), "n_unchanged": self.n_unchanged,
                "n_bn_layers_changed": sum(layer.status != "unchanged" for layer in self.bn_layers),
                "n_dead_before": self.n_dead_before, "n_dead_after": self.n_dead_after,
                "n_died": self.n_died, "n_revived": self.n_revived, "text": self.summary_line()}

    def to_dict(self) -> dict[str, Any]:
        refs = [CheckpointRef(c.path, c.format, c.sha256) for c in (self.a, self.b)]
        return envelope("diff", refs, self.summary(), {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "layout": {"a": self.inspect_a.layout.to_dict(), "b": self.inspect_b.layout.to_dict()},
            "thresholds": self.thresholds.to_dict(),
            "atol": self.atol,
            "modalities": {name: m.to_dict() for name, m in self.modalities.items()},
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": [c.to_dict() for c in self.changed],
            "bn_layers": [layer.to_dict() for layer in self.bn_layers],
        })

    def to_frame(self):
        """One row per changed tensor (pandas DataFrame); non-finite values stay floats here."""
        import pandas as pd

        columns = ["name", "modality", "reasons", "shape_a", "shape_b", "dtype_a", "dtype_b", "n_elements",
                   "n_changed_elements", "max_abs_diff", "rel_change", "channels", "n_channels_changed"]
        rows = []
        for c in self.changed:
            rows.append({"name": c.name, "modality": c.modality, "reasons": ",".join(c.reasons),
                         "shape_a": str(tuple(c.shape_a)), "shape_b": str(tuple(c.shape_b)),
                         "dtype_a": c.dtype_a, "dtype_b": c.dtype_b, "n_elements": c.n_elements,
                         "n_changed_elements": c.n_changed_elements,
                         "max_abs_diff": np.nan if c.max_abs_diff is None else c.max_abs_diff,
                         "rel_change": np.nan if c.rel_change is None else c.rel_change,
                         "channels": c.channels, "n_channels_changed": c.n_channels_changed})
        frame = pd.DataFrame(rows, columns=columns)
        for col in ("n_elements", "n_changed_elements", "channels", "n_channels_changed"):
            frame[col] = frame[col].astype("Int64")  # None (shape change, not per channel) -> <NA>
        return frame



def diff(a: str | Path | Subject, b: str | Path | Subject, *, thresholds: Thresholds | None = None,
         atol: float = 0.0, load: LoadOptions | None = None) -> DiffResult:
    """Compare checkpoint ``a`` (before) with ``b`` (after).

    Each file is opened once (with ``load``: allowed globals, modality prefixes, BN eps, assumed
    activation), scanned statically (BN verdicts, SHA-256) with the same ``thresholds``, then compared
    tensor by tensor. ``atol`` is the element tolerance (0: bit-exact). Raises
    :class:`avdiag.errors.AvdiagError` subclasses for unreadable or refused files, like ``inspect``.
    """
    atol = float(atol)
    if not atol >= 0.0:  # also refuses NaN
        raise UsageError(f"--atol must be >= 0, got {atol}")
    thresholds = thresholds or Thresholds()
    subject_a, subject_b = Subject.of(a, load), Subject.of(b, load)
    ins_a, ins_b = scan(subject_a, thresholds), scan(subject_b, thresholds)
    store_a, store_b = subject_a.ckpt.tensors, subject_b.ckpt.tensors

    per_channel = per_channel_names(ins_a) | per_channel_names(ins_b)

    def modality_of(name: str) -> str:
        return (ins_a if name in store_a else ins_b).layout.modality_of(name)

    added, removed, changed, n_unchanged, common = compare_tensors(store_a, store_b, per_channel, modality_of, atol)
    bn_layers = compare_bn_layers(ins_a, ins_b, {c.name: c for c in changed})
    modalities = compare_modalities(ins_a, ins_b, bn_layers, count_by(added, modality_of),
                                    count_by(removed, modality_of), changed, common)
    return DiffResult(ins_a.checkpoint, ins_b.checkpoint, atol, thresholds, added, removed, changed, n_unchanged,
                      bn_layers, modalities, ins_a, ins_b)



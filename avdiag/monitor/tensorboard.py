"""TensorBoard scalars of the monitor's records, when ``torch.utils.tensorboard`` can be imported
(it needs the ``tensorboard`` package: ``pip install avdiag[tensorboard]``)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any


class TensorBoardScalars:
    """Every number of a record as a scalar ``<kind>/<key>/<key>...`` at its step (epoch records at theirs)."""

    def __init__(self, writer: Any):
        self.writer = writer

    def write(self, record: dict[str, Any]) -> None:
        at = record["step"] if record["kind"] == "step" else record["epoch"]
        for tag, value in flatten(record, record["kind"]):
            self.writer.add_scalar(tag, value, at)

    def close(self) -> None:
        self.writer.close()


def flatten(obj: Any, prefix: str) -> list[tuple[str, float]]:
    """(tag, number) for every finite number under ``obj`` (booleans and the record's counters left out)."""
    if isinstance(obj, dict):
        return [pair for k, v in obj.items() if k not in ("kind", "step", "epoch")
                for pair in flatten(v, f"{prefix}/{k}")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        return [(prefix, float(obj))]
    return []


def open_tensorboard(folder: str | Path) -> TensorBoardScalars | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("monitor: tensorboard is not installed (pip install tensorboard): no TensorBoard scalars; "
                      "the run log is written as usual", stacklevel=3)
        return None
    return TensorBoardScalars(SummaryWriter(str(folder)))

"""The modality gap, as MMCSAL (cold-start multimodal active learning) defines it: the Euclidean
distance between the centroids of the two modalities' L2-normalised pooled features (a zero feature
stays zero). It needs equal feature sizes; otherwise the distance is None with the reason. The
result keeps the sums of the normalised features, so shards combine by adding them (exact up to the
float summation order)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from avdiag.measure.contribution.passes import MODALITIES, run
from avdiag.measure.contribution.table import float_column, json_column
from avdiag.models.parts import AVParts
from avdiag.results import finite


@dataclass(frozen=True, eq=False)
class ModalityGap:
    """Distance between the modalities' feature centroids, over ``n`` samples."""

    distance: float | None
    n: int
    dims: dict[str, int]
    reason: str | None = None
    feature_sums: dict[str, np.ndarray] | None = None  # sum of the L2-normalised pooled features

    @classmethod
    def from_sums(cls, feature_sums: dict[str, np.ndarray], n: int, dims: dict[str, int]) -> "ModalityGap":
        if dims["audio"] != dims["visual"]:
            return cls(None, n, dict(dims), f"feature sizes differ (audio {dims['audio']}, visual {dims['visual']})",
                       feature_sums)
        centroid = {m: feature_sums[m] / n for m in MODALITIES}
        return cls(float(np.linalg.norm(centroid["audio"] - centroid["visual"])), n, dict(dims), None, feature_sums)

    def to_dict(self, records: bool = True) -> dict:
        """The figures; with ``records`` also the feature sums (what ``combine`` needs)."""
        out = {"distance": finite(self.distance), "n": self.n, "dims": dict(self.dims), "reason": self.reason}
        if records:
            out["feature_sums"] = None if self.feature_sums is None else \
                {m: json_column(s) for m, s in self.feature_sums.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModalityGap":
        """From ``to_dict()``: recomputed from the feature sums when they are there, else as written
        (a null distance with a reason stays None; without one it is a non-finite distance, NaN)."""
        dims = {m: int(v) for m, v in d["dims"].items()}
        if d.get("feature_sums") is not None:
            return cls.from_sums({m: float_column(v) for m, v in d["feature_sums"].items()}, int(d["n"]), dims)
        distance = d["distance"]
        if distance is None and not d.get("reason"):
            distance = float("nan")
        return cls(None if distance is None else float(distance), int(d["n"]), dims, d.get("reason"))

    @classmethod
    def combine(cls, results: Sequence["ModalityGap"]) -> "ModalityGap":
        """The gap over disjoint shards together: their feature sums added."""
        if not results:
            raise ValueError("nothing to combine")
        if any(r.feature_sums is None for r in results):
            raise ValueError("a modality gap written without its feature sums cannot be combined")
        if any(r.dims != results[0].dims for r in results):
            raise ValueError(f"shards disagree on dims: {results[0].dims!r} vs {[r.dims for r in results]!r}")
        sums = {m: np.sum([r.feature_sums[m] for r in results], axis=0) for m in MODALITIES}
        return cls.from_sums(sums, sum(r.n for r in results), results[0].dims)


class GapCollector:
    """Running sums of the L2-normalised pooled features of a pass."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}
        self.n = 0

    def add(self, parts: AVParts, batch: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
            index: torch.Tensor) -> None:
        for m in MODALITIES:
            unit = F.normalize(feats[m].double(), dim=1).sum(dim=0)
            self.sums[m] = unit if m not in self.sums else self.sums[m] + unit
            self.dims[m] = int(feats[m].shape[1])
        self.n += int(index.shape[0])

    def result(self) -> ModalityGap:
        return ModalityGap.from_sums({m: s.cpu().numpy() for m, s in self.sums.items()}, self.n, self.dims)


def measure(parts: AVParts, batches: Iterable[dict], device: torch.device | str = "cpu", *,
            tf32: bool = False) -> ModalityGap:
    """The modality gap over ``batches`` (eval mode, no gradients)."""
    collector = GapCollector()
    run(parts, batches, device, [collector], tf32=tf32)
    return collector.result()

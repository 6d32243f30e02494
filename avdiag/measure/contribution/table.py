"""Per-sample columns (numpy arrays keyed by name, one entry per sample) as the contribution
results keep them: in JSON and back, merged across shards, and put in dataset-index order (the
order every dataset-level sum runs in, so that merged shards give the figures of one run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from avdiag.results import finite

Columns = dict[str, np.ndarray]


def json_column(a: np.ndarray) -> list:
    """A 1-D or 2-D array as JSON lists: integers and booleans as they are, non-finite floats as None."""
    if a.ndim > 1:
        return [json_column(row) for row in a]
    if a.dtype.kind == "b":
        return a.tolist()
    if a.dtype.kind in "iu":
        return a.astype(np.int64).tolist()
    return [finite(x) for x in a.astype(np.float64).tolist()]


def float_column(values: list) -> np.ndarray:
    """JSON floats back to float64; None (a non-finite value) reads back as NaN."""
    return np.array(values, dtype=np.float64)


def int_column(values: list) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def bool_column(values: list) -> np.ndarray:
    return np.asarray(values, dtype=bool)


def feature_matrix(values: list, d: int) -> np.ndarray:
    """(n, d) float64 from JSON rows; None reads back as NaN."""
    return np.array(values, dtype=np.float64).reshape(-1, d)


def index_order(index: np.ndarray) -> np.ndarray:
    """The permutation that puts samples in dataset-index order (stable)."""
    return np.argsort(index, kind="stable")


def disjoint_index(indices: Sequence[np.ndarray], what: str = "shards") -> np.ndarray:
    """The concatenated indices; ValueError when two shards hold the same sample."""
    index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    if len(np.unique(index)) != len(index):
        raise ValueError(f"{what} share sample indices: they must be disjoint (drop padded repeats)")
    return index


def concat(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate same-keyed dicts of arrays (nested one level for dicts of arrays)."""
    out = {}
    for key, first in parts[0].items():
        if isinstance(first, dict):
            out[key] = {k: np.concatenate([p[key][k] for p in parts]) for k in first}
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def reorder(columns: dict[str, Any], order: np.ndarray) -> dict[str, Any]:
    """Every array (and every array of a nested dict) taken in ``order``."""
    return {k: ({m: x[order] for m, x in v.items()} if isinstance(v, dict) else v[order]) for k, v in columns.items()}

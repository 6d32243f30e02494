"""One pass over every tensor: non-finite values, plus the few tensors later steps need."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from avdiag.load.store import TensorStore

_CHUNK = 1 << 22  # elements checked at a time: bounds the temporary mask to 4 MB


@dataclass
class TensorScan:
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor name -> count of NaN/Inf
    kept: dict[str, np.ndarray] = field(default_factory=dict)  # small tensors asked for, as float64
    filter_norms: dict[str, np.ndarray] = field(default_factory=dict)  # conv weight name -> per-filter L2
    n_tensors: int = 0
    n_elements: int = 0


def scan_tensors(store: TensorStore, keep: set[str], filter_banks: set[str]) -> TensorScan:
    """Read each tensor once: count non-finite values, keep ``keep``, norm the rows of ``filter_banks``."""
    scan = TensorScan()
    for name in store.names():
        tensor = store.get(name)
        scan.n_tensors += 1
        scan.n_elements += tensor.numel()
        if tensor.is_floating_point() or tensor.is_complex():
            bad = count_nonfinite(tensor)
            if bad:
                scan.nonfinite[name] = bad
        if name in keep:
            scan.kept[name] = tensor.detach().to(torch.float64).reshape(-1).numpy().copy()
        if name in filter_banks and tensor.dim() >= 2:
            flat = tensor.detach().reshape(tensor.shape[0], -1).to(torch.float64)
            scan.filter_norms[name] = torch.linalg.vector_norm(flat, dim=1).numpy()
        del tensor
    return scan


def count_nonfinite(tensor: torch.Tensor) -> int:
    flat = tensor.detach().reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            bad += int((~torch.isfinite(chunk)).sum())
    return bad

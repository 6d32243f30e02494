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
            # float32 accumulation: no full-size float64 copy of a large conv weight
            scan.filter_norms[name] = filter_norms(tensor)
        del tensor
    return scan


def filter_norms(weight: torch.Tensor) -> np.ndarray:
    """L2 norm of each output filter, accumulated in float32 (float64 for float64 weights): a large
    conv weight is never copied whole into float64."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if rows.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        rows = rows.to(acc)  # integer / float8 weights have no norm kernel of their own
    return torch.linalg.vector_norm(rows, dim=1, dtype=acc).to(torch.float64).numpy()


def count_nonfinite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf values. One min/max pass (NaN propagates, Inf shows as an extreme) decides
    whether a counting pass is needed at all; neither pass allocates a full-size mask."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    try:
        lo, hi = torch.aminmax(flat)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return 0
    except RuntimeError:  # dtypes without a min/max kernel (float8): count directly
        flat = flat.to(torch.float32)
    bad = 0
    for start in range(0, flat.numel(), _CHUNK):
        bad += int((~torch.isfinite(flat[start:start + _CHUNK])).sum())
    return bad

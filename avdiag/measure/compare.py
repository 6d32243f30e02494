"""What changed between two checkpoints, tensor by tensor and BN channel by channel.

The two tensor stores are compared one tensor
at a time: each pair is read, compared in chunks and released before the next, so no more than one
tensor of each side (beyond memory maps) is held at once. Tensor names are compared after wrapper
prefixes are stripped, so a ``module.``-prefixed checkpoint and its plain twin line up.

A tensor present in both is *changed* when its shape or dtype differs or its values differ. With
``atol=0`` values are compared bit for bit (``-0.0`` differs from ``+0.0``); with ``atol > 0`` two
elements are equal when ``|b - a| <= atol``. NaN at the same place on both sides always counts as
equal, as does the same infinity.

For each changed tensor: the largest ``|b - a|``, the relative change ``||b - a|| / ||a||`` (L2 over
all elements, accumulated in float64; places where both sides are NaN are left out of both norms)
and, for per-channel tensors (BatchNorm parameters and conv weights, dim 0 = channels), how many
channels hold a changed element. Per BatchNorm layer the static verdicts of both inspections give
the channels that died (dead in B, not in A) and revived (dead in A, not in B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avdiag.load.store import TensorStore
from avdiag.measure.static import LayerVerdicts, json_float

__all__ = ["BNLayerDiff", "ModalityDiff", "TensorChange", "ValueComparison", "compare_bn_layers",
           "compare_modalities", "compare_tensors", "compare_values", "count_by", "per_channel_names"]

_CHUNK = 1 << 22  # elements compared at a time: bounds the float64 temporaries to ~32 MB each
_ROLES = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

SHAPE, DTYPE, VALUES = "shape", "dtype", "values"


# ---- results ------------------------------------------------------------------------------------


@dataclass
class TensorChange:
    """One tensor present in both checkpoints that differs in shape, dtype or values."""

    name: str
    modality: str
    reasons: list[str]  # any of "shape", "dtype", "values"
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    n_elements: int | None = None  # None when the shapes differ (no element-wise comparison)
    n_changed_elements: int | None = None
    max_abs_diff: float | None = None
    rel_change: float | None = None  # ||b - a|| / ||a||; inf when ||a|| = 0 and b differs
    channels: int | None = None  # dim 0 of a per-channel tensor (BN parameter, conv weight)
    n_channels_changed: int | None = None
    changed_channels: list[int] | None = field(default=None, repr=False)  # not in the JSON (can be long)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "reasons": list(self.reasons),
                "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "n_elements": self.n_elements, "n_changed_elements": self.n_changed_elements,
                "max_abs_diff": json_float(self.max_abs_diff), "rel_change": json_float(self.rel_change),
                "channels": self.channels, "n_channels_changed": self.n_channels_changed}


@dataclass
class BNLayerDiff:
    """One BatchNorm layer of either checkpoint: how its parameters moved and which channels died."""

    name: str
    modality: str
    status: str  # changed / unchanged / added (only in B) / removed (only in A) / resized (channels differ)
    channels_a: int | None
    channels_b: int | None
    rel_change: dict[str, float | None]  # gamma / beta / running_mean / running_var -> ||b - a|| / ||a||
    n_channels_changed: int | None
    dead_before: list[int] | None  # static verdicts of A (None: not in A)
    dead_after: list[int] | None  # static verdicts of B (None: not in B)
    died: list[int]  # dead in B, not in A (same channel count only)
    revived: list[int]  # dead in A, not in B
    changed_channels: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "status": self.status,
                "channels_a": self.channels_a, "channels_b": self.channels_b,
                "rel_change": {k: json_float(v) for k, v in self.rel_change.items()},
                "n_channels_changed": self.n_channels_changed,
                "n_dead_before": None if self.dead_before is None else len(self.dead_before),
                "n_dead_after": None if self.dead_after is None else len(self.dead_after),
                "died": list(self.died), "revived": list(self.revived)}


@dataclass
class ModalityDiff:
    name: str
    n_bn_channels_before: int
    n_bn_channels_after: int
    n_dead_before: int
    n_dead_after: int
    n_died: int
    n_revived: int
    n_tensors: int  # tensors of this modality present in both
    n_changed_tensors: int
    n_added_tensors: int
    n_removed_tensors: int
    mean_rel_change: float | None  # mean over its changed tensors with a finite relative change

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "name"}
        d["mean_rel_change"] = json_float(self.mean_rel_change)
        return d


def per_channel_names(result) -> set[str]:
    """BN parameters and the conv weights feeding BNs: dim 0 is the channel."""
    out = set()
    for v in result.layers:
        out.update(v.layer.params.values())
        if v.layer.conv:
            out.add(v.layer.conv + ".weight")
    return out


def _is_per_channel(name: str, shape: tuple[int, ...], known: set[str]) -> bool:
    if not shape or shape[0] == 0:
        return False
    # conv weights (Conv1d/2d/3d: out, in, *kernel) are per channel even where no BN follows them
    return name in known or (len(shape) >= 3 and name.rsplit(".", 1)[-1] == "weight")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compare_tensors(store_a: TensorStore, store_b: TensorStore, per_channel: set[str], modality_of, atol: float):
    removed = [n for n in store_a.names() if n not in store_b]
    added = [n for n in store_b.names() if n not in store_a]
    changed: list[TensorChange] = []
    n_unchanged = 0
    common: dict[str, int] = {}  # modality -> tensors present in both
    for name in store_a.names():
        if name not in store_b:
            continue
        modality = modality_of(name)
        common[modality] = common.get(modality, 0) + 1
        ia, ib = store_a.info(name), store_b.info(name)
        change = TensorChange(name, modality, [], tuple(ia.shape), tuple(ib.shape),
                              _dtype_name(ia.dtype), _dtype_name(ib.dtype))
        if ia.shape != ib.shape:
            change.reasons.append(SHAPE)
        if ia.dtype != ib.dtype:
            change.reasons.append(DTYPE)
        if SHAPE not in change.reasons:
            channels = ia.shape[0] if _is_per_channel(name, tuple(ia.shape), per_channel) else None
            ta, tb = store_a.get(name), store_b.get(name)
            cmp = compare_values(ta, tb, atol=atol, channels=channels)
            del ta, tb  # one tensor of each side at a time
            if cmp.n_changed:
                change.reasons.append(VALUES)
            if change.reasons:
                change.n_elements = cmp.n_elements
                change.n_changed_elements = cmp.n_changed
                change.max_abs_diff = cmp.max_abs_diff
                change.rel_change = cmp.rel_change
                if cmp.channel_changed is not None:
                    change.channels = channels
                    change.changed_channels = [int(i) for i in np.flatnonzero(cmp.channel_changed)]
                    change.n_channels_changed = len(change.changed_channels)
        if change.reasons:
            changed.append(change)
        else:
            n_unchanged += 1
    return added, removed, changed, n_unchanged, common


# ---- element-wise comparison --------------------------------------------------------------------


@dataclass
class ValueComparison:
    n_elements: int
    n_changed: int
    max_abs_diff: float
    sumsq_diff: float
    sumsq_a: float
    channel_changed: np.ndarray | None  # bool per channel (dim 0), when asked for

    @property
    def rel_change(self) -> float:
        if math.isnan(self.sumsq_diff) or math.isnan(self.sumsq_a):
            return math.nan
        if self.sumsq_diff == 0.0:
            return 0.0
        if self.sumsq_a == 0.0:
            return math.inf
        return math.sqrt(self.sumsq_diff) / math.sqrt(self.sumsq_a)


def compare_values(a: torch.Tensor, b: torch.Tensor, *, atol: float = 0.0,
                   channels: int | None = None) -> ValueComparison:
    """Compare two same-shape tensors element by element, ``_CHUNK`` elements at a time.

    Chunks that are bit-identical cost one integer comparison; the float64 (complex128) work is done
    only where something differs. With ``channels``, chunks are whole rows of dim 0 and the result
    tells which rows hold a changed element.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    n = fa.numel()
    row = n // channels if channels else 0
    step = max(row, (_CHUNK // row) * row) if row else _CHUNK
    same_dtype = fa.dtype == fb.dtype
    wide = torch.complex128 if (fa.is_complex() or fb.is_complex()) else torch.float64
    mask = np.zeros(channels, dtype=bool) if channels else None
    n_changed, max_abs, sumsq_d, sumsq_a = 0, 0.0, 0.0, 0.0
    pending: list[tuple[int, int]] = []  # bit-identical chunks seen before the first difference
    dirty = False
    for start in range(0, n, step):
        stop = min(start + step, n)
        ca, cb = fa[start:stop], fb[start:stop]
        if same_dtype and torch.equal(_bits(ca), _bits(cb)):
            if dirty:
                sumsq_a += _sumsq(ca, wide)
            else:
                pending.append((start, stop))
            continue
        if not dirty:
            dirty = True
            sumsq_a += sum(_sumsq(fa[s:e], wide) for s, e in pending)
            pending.clear()
        ua, ub = ca.to(wide), cb.to(wide)
        d = ub - ua
        dsq = float(torch.dot(d, d)) if wide == torch.float64 else math.nan
        if math.isfinite(dsq):
            # no NaN or Inf on either side of this chunk (d would hold one): plain arithmetic
            sumsq_d += dsq
            sumsq_a += float(torch.dot(ua, ua))
            lo, hi = torch.aminmax(d)
            max_abs = _nanmax(max_abs, max(-float(lo), float(hi)))
            if atol == 0.0 and same_dtype:
                unequal = ~_bits_equal(ca, cb)  # -0.0 vs +0.0 differs here, not in d
            elif atol == 0.0:
                unequal = d != 0
            else:
                unequal = d.abs() > atol
        else:
            unequal, dmax, dsq, asq = _nonfinite_chunk(ca, cb, ua, ub, d, atol, same_dtype)
            sumsq_d += dsq
            sumsq_a += asq
            max_abs = _nanmax(max_abs, dmax)
        n_changed += int(torch.count_nonzero(unequal))
        if mask is not None:
            rows = unequal.reshape(-1, row).any(dim=1).numpy()
            mask[start // row: start // row + rows.size] |= rows
        del ua, ub, d, unequal
    return ValueComparison(n, n_changed, max_abs, sumsq_d, sumsq_a, mask)


def _nonfinite_chunk(ca, cb, ua, ub, d, atol, same_dtype):
    """A chunk with NaN or Inf somewhere (or complex): NaN on both sides and equal infinities count as
    equal and are left out of the norms; any other NaN makes the result NaN."""
    zero = torch.zeros((), dtype=ua.dtype)
    both_nan = torch.isnan(ua) & torch.isnan(ub)
    same = (ua == ub) | both_nan
    if atol == 0.0 and same_dtype:
        equal = _bits_equal(ca, cb) | both_nan
    elif atol == 0.0:
        equal = same
    else:
        equal = same | (d.abs() <= atol)
    diff = torch.where(same, zero, d).abs()
    a_abs = torch.where(both_nan, zero, ua).abs()
    dmax = float(diff.max()) if diff.numel() else 0.0
    return ~equal, dmax, float((diff * diff).sum()), float((a_abs * a_abs).sum())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as signed integers of the same width; complex: (n, 2) for (real, imag)."""
    t = t.contiguous()
    if t.is_complex():
        return torch.view_as_real(t).view(_INT_OF_SIZE[t.dtype.itemsize // 2])
    return t.view(_INT_OF_SIZE[t.dtype.itemsize])


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: are the bits of ``a`` and ``b`` (same dtype) identical?"""
    eq = _bits(a) == _bits(b)
    return eq.all(dim=-1) if a.is_complex() else eq


def _sumsq(t: torch.Tensor, wide: torch.dtype) -> float:
    """Sum of |t|^2 in float64, NaN places left out (they are NaN on both sides: equal)."""
    total = 0.0
    for start in range(0, t.numel(), _CHUNK):
        x = t[start:start + _CHUNK].to(wide).abs()
        total += float(torch.nansum(x * x))
    return total


def _nanmax(acc: float, value: float) -> float:
    if math.isnan(acc) or math.isnan(value):
        return math.nan
    return max(acc, value)


# ---- BN layers and modalities -------------------------------------------------------------------


def compare_bn_layers(ins_a, ins_b, changed: dict[str, TensorChange]) -> list[BNLayerDiff]:
    layers_a = {v.layer.name: v for v in ins_a.layers}
    layers_b = {v.layer.name: v for v in ins_b.layers}
    order = list(layers_a) + [n for n in layers_b if n not in layers_a]
    return [_diff_layer(name, layers_a.get(name), layers_b.get(name), changed) for name in order]


def _diff_layer(name: str, va: LayerVerdicts | None, vb: LayerVerdicts | None,
                changed: dict[str, TensorChange]) -> BNLayerDiff:
    roles = {role: None for role in _ROLES.values()}
    modality = (va or vb).layer.modality
    if va is None or vb is None:
        return BNLayerDiff(name, modality, "added" if va is None else "removed",
                           va.layer.channels if va else None, vb.layer.channels if vb else None, roles, None,
                           list(va.dead) if va else None, list(vb.dead) if vb else None, [], [])
    ca, cb = va.layer.channels, vb.layer.channels
    if ca != cb:
        return BNLayerDiff(name, modality, "resized", ca, cb, roles, None, list(va.dead), list(vb.dead), [], [])
    touched = False
    channel_mask = np.zeros(ca, dtype=bool)
    for role, key in _ROLES.items():
        ta, tb = va.layer.params.get(role), vb.layer.params.get(role)
        if ta is None or tb is None or ta != tb:
            continue  # affine in one checkpoint only: the tensors are listed as added / removed
        c = changed.get(ta)
        if c is None:
            roles[key] = 0.0
            continue
        touched = True
        roles[key] = c.rel_change
        if c.changed_channels is not None:
            channel_mask[c.changed_channels] = True
    dead_a, dead_b = set(va.dead), set(vb.dead)
    return BNLayerDiff(name, modality, "changed" if touched else "unchanged", ca, cb, roles,
                       int(channel_mask.sum()), list(va.dead), list(vb.dead), sorted(dead_b - dead_a),
                       sorted(dead_a - dead_b), [int(i) for i in np.flatnonzero(channel_mask)])


def compare_modalities(ins_a, ins_b, layers: list[BNLayerDiff],
                     added_by: dict[str, int], removed_by: dict[str, int], changed: list[TensorChange],
                     common_by: dict[str, int]) -> dict[str, ModalityDiff]:
    changed_by: dict[str, list[TensorChange]] = {}
    for c in changed:
        changed_by.setdefault(c.modality, []).append(c)
    order = list(ins_a.modalities) + [m for m in ins_b.modalities if m not in ins_a.modalities]
    order += sorted((set(common_by) | set(added_by) | set(removed_by)) - set(order))  # e.g. "other" (heads)
    out = {}
    for m in order:
        sa, sb = ins_a.modalities.get(m), ins_b.modalities.get(m)
        group = [layer for layer in layers if layer.modality == m]
        mine = changed_by.get(m, [])
        rels = [c.rel_change for c in mine if c.rel_change is not None and math.isfinite(c.rel_change)]
        out[m] = ModalityDiff(
            m, sa.n_bn_channels if sa else 0, sb.n_bn_channels if sb else 0,
            sa.n_dead if sa else 0, sb.n_dead if sb else 0,
            sum(len(layer.died) for layer in group), sum(len(layer.revived) for layer in group),
            common_by.get(m, 0), len(mine), added_by.get(m, 0), removed_by.get(m, 0),
            float(np.mean(rels)) if rels else None)
    return out


def count_by(names: list[str], modality_of) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        m = modality_of(n)
        out[m] = out.get(m, 0) + 1
    return out

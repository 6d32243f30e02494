"""Static scan of LayerNorm (and RMSNorm) layers, from their parameters alone.

A LayerNorm normalises each token's D features, ``xhat = (x - mean) / sqrt(var + eps)``, then applies
``y_k = gamma_k * xhat_k + beta_k``. Whatever the input, ``|xhat_k| <= sqrt(D - 1)`` (the squares of
the normalised features sum to at most D), so feature k's output never leaves
``beta_k +- |gamma_k| * sqrt(D - 1)``. What the parameters alone support:

- ``constant_features``: ``|gamma_k| * sqrt(D - 1) < constant_scale``: the feature's output is
  beta_k for every input, up to ``constant_scale``. It carries no information to the layers it
  feeds: a dead *input* of the attention or MLP that follows. This is a bound, not an estimate.
- ``low_gain_features``: ``|gamma_k|`` below ``low_gain`` times the layer's median ``|gamma|``.
- ``nonfinite_features``: gamma or beta is NaN or infinite.
- ``collapsed_rows`` of the Linear layers feeding the normalised stream: the layers in the norm's own
  block whose output size is D (an attention output projection, an MLP's second layer: what writes
  the residual stream the norm reads), rows (output units) whose L2 norm is below ``collapsed_filter``
  times the layer's median row norm.

What the parameters cannot say: whether a feature is *dead* after the activation that follows (its
pre-activation depends on the data, on the residual stream and on the next Linear layer's weights):
that takes the dormant-unit measurement on data (:mod:`avdiag.measure.dormant`). No claim of "dead"
is made here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avdiag.findings import INFO, WARNING, Finding
from avdiag.results import finite

CONSTANT_FEATURES = "layernorm-constant-features"
COLLAPSED_ROWS = "layernorm-collapsed-rows"
LOW_GAIN_FEATURES = "layernorm-low-gain-features"

_NORM_LEAF = re.compile(r"(?:^|_)(?:norm\d*|ln|ln_\w+|ln\d+|layer_?norm|layernorm|rms_?norm)(?:_[a-z0-9]+)?$",
                        re.IGNORECASE)


@dataclass(frozen=True)
class LayerNormThresholds:
    constant_scale: float = 1e-3  # |gamma| * sqrt(D - 1) below this: constant output
    low_gain: float = 1e-2  # |gamma| below this times the layer's median |gamma|
    collapsed_filter: float = 1e-6  # feeding Linear rows: norm below this times the median row norm

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class LayerNormVerdicts:
    name: str
    modality: str
    features: int
    has_bias: bool
    constant: list[int]
    low_gain: list[int]
    nonfinite: list[int]
    min_abs_gain: float | None
    collapsed_rows: dict[str, list[int]] = field(default_factory=dict)  # feeding Linear -> collapsed rows

    @property
    def flagged(self) -> bool:
        return bool(self.constant or self.low_gain or self.nonfinite or any(self.collapsed_rows.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "layernorm", "modality": self.modality, "features": self.features,
                "has_bias": self.has_bias, "constant_features": self.constant, "low_gain_features": self.low_gain,
                "nonfinite_features": self.nonfinite, "min_abs_gain": finite(self.min_abs_gain),
                "feeding_linears": {name: {"collapsed_rows": rows} for name, rows in self.collapsed_rows.items()}}


@dataclass
class LayerNormScan:
    thresholds: LayerNormThresholds
    layers: list[LayerNormVerdicts]

    def totals(self) -> dict[str, int]:
        return {"n_layers": len(self.layers), "n_features": sum(v.features for v in self.layers),
                "n_constant": sum(len(v.constant) for v in self.layers),
                "n_low_gain": sum(len(v.low_gain) for v in self.layers),
                "n_nonfinite": sum(len(v.nonfinite) for v in self.layers),
                "n_collapsed_rows": sum(len(r) for r in {k: r for v in self.layers
                                                         for k, r in v.collapsed_rows.items()}.values())}

    def modalities(self) -> dict[str, dict[str, int]]:
        out: dict[str, list[LayerNormVerdicts]] = {}
        for v in self.layers:
            out.setdefault(v.modality, []).append(v)
        return {name: LayerNormScan(self.thresholds, group).totals() for name, group in out.items()}

    def summary_text(self) -> str:
        t = self.totals()
        return (f"{t['n_layers']} LayerNorm layers, {t['n_features']} features: {t['n_constant']} constant, "
                f"{t['n_low_gain']} low-gain, {t['n_nonfinite']} non-finite; {t['n_collapsed_rows']} collapsed rows "
                "in the Linear layers feeding them (without data, nothing here says dead)")

    def to_dict(self) -> dict[str, Any]:
        return {**self.totals(), "thresholds": self.thresholds.to_dict(),
                "modalities": self.modalities(), "layers": [v.to_dict() for v in self.layers]}

    def findings(self) -> list[Finding]:
        out = []
        for v in self.layers:
            if v.constant:
                out.append(Finding(CONSTANT_FEATURES, WARNING, v.name,
                                   f"{v.name}: {len(v.constant)}/{v.features} LayerNorm features output a constant "
                                   f"(|gamma| * sqrt(D-1) < {self.thresholds.constant_scale:g}): dead inputs to what "
                                   f"follows {_preview(v.constant)}"))
            if v.low_gain:
                out.append(Finding(LOW_GAIN_FEATURES, INFO, v.name,
                                   f"{v.name}: {len(v.low_gain)}/{v.features} LayerNorm features with |gamma| < "
                                   f"{self.thresholds.low_gain:g} x the layer's median {_preview(v.low_gain)}"))
        readers: dict[str, list[str]] = {}
        for v in self.layers:
            for linear, rows in v.collapsed_rows.items():
                if rows:
                    readers.setdefault(linear, []).append(v.name)
        for linear, norms in readers.items():
            rows = next(v.collapsed_rows[linear] for v in self.layers if v.name == norms[0])
            out.append(Finding(COLLAPSED_ROWS, WARNING, linear,
                               f"{linear}: {len(rows)} output rows ~0 (norm < {self.thresholds.collapsed_filter:g} x "
                               f"median), in the block of {', '.join(norms)} {_preview(rows)}"))
        return out


def find_layernorms(names: list[str], shape_of, is_bn) -> list[tuple[str, str, str | None, int]]:
    """(module, weight tensor, bias tensor or None, features) of every LayerNorm-like module: a 1-D
    ``weight`` (with a 1-D ``bias`` of the same size, or none: RMSNorm), no running statistics, a
    norm-like leaf name (norm, norm1, norm_a, ln_1, ln_final, layer_norm, LayerNorm, ...)."""
    present = set(names)
    found = []
    for n in names:
        if not n.endswith(".weight"):
            continue
        module = n[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        shape = shape_of(n)
        if len(shape) != 1 or is_bn(module) or not _NORM_LEAF.search(leaf):
            continue
        bias = module + ".bias"
        has_bias = bias in present and tuple(shape_of(bias)) == tuple(shape)
        found.append((module, n, bias if has_bias else None, int(shape[0])))
    return found


def scan_layernorms(store, modality_of, bn_modules: set[str],
                    thresholds: LayerNormThresholds | None = None) -> LayerNormScan:
    """Scan every LayerNorm-like module of the tensor ``store`` (see the module docstring)."""
    t = thresholds or LayerNormThresholds()
    names = store.names()
    shape_of = lambda n: tuple(store.info(n).shape)  # noqa: E731
    norms = find_layernorms(names, shape_of, lambda m: m in bn_modules)
    owners = _feeding_linears([(module, d) for module, _, _, d in norms], names, shape_of)
    layers = []
    for module, weight, bias, d in norms:
        gamma = _array(store.get(weight))
        beta = _array(store.get(bias)) if bias else np.zeros(d)
        collapsed = {linear: _collapsed_rows(store.get(linear + ".weight"), t) for linear in owners.get(module, [])}
        layers.append(_judge(module, modality_of(module), gamma, beta, bias is not None, t, collapsed))
    return LayerNormScan(t, layers)


def _judge(name: str, modality: str, gamma: np.ndarray, beta: np.ndarray, has_bias: bool, t: LayerNormThresholds,
           collapsed: dict[str, list[int]]) -> LayerNormVerdicts:
    d = len(gamma)
    bad = ~(np.isfinite(gamma) & np.isfinite(beta))
    gain = np.abs(np.where(bad, np.nan, gamma))
    reach = gain * math.sqrt(max(d - 1, 1))
    with np.errstate(invalid="ignore"):
        constant = np.flatnonzero(~bad & (reach < t.constant_scale))
        median = float(np.nanmedian(gain)) if (~bad).any() else math.nan
        low = np.flatnonzero(~bad & (gain < t.low_gain * median)) if median > 0 else np.array([], dtype=int)
    low = np.setdiff1d(low, constant)
    ok = gain[~bad]
    return LayerNormVerdicts(name, modality, d, has_bias, constant.tolist(), low.tolist(), np.flatnonzero(bad).tolist(),
                             float(ok.min()) if ok.size else None, collapsed)


def _feeding_linears(norms: list[tuple[str, int]], names: list[str], shape_of) -> dict[str, list[str]]:
    """Norm -> the Linear layers (2-D weights with D outputs) of its own block, each Linear going to the
    norms with the deepest block that holds it (a block's norm1 and norm2, not the encoder's final norm)."""
    owners: dict[str, list[str]] = {}
    for n in names:
        shape = shape_of(n)
        if not n.endswith(".weight") or len(shape) != 2 or shape[1] < 2:
            continue
        linear = n[: -len(".weight")]
        scoped = [(module, module.rsplit(".", 1)[0] + ".") for module, d in norms
                  if "." in module and d == shape[0] and linear.startswith(module.rsplit(".", 1)[0] + ".")]
        deepest = max((len(parent) for _, parent in scoped), default=0)
        for module, parent in scoped:
            if len(parent) == deepest:
                owners.setdefault(module, []).append(linear)
    return owners


def _collapsed_rows(weight: torch.Tensor, t: LayerNormThresholds) -> list[int]:
    rows = _array(weight.reshape(weight.shape[0], -1))
    norms = np.linalg.norm(np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0), axis=1)
    median = float(np.median(norms))
    return np.flatnonzero(norms < t.collapsed_filter * median).tolist() if median > 0 else []


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy().reshape(-1) if tensor.dim() < 2 else \
        tensor.detach().to(torch.float64).cpu().numpy()


def _preview(items: list[int], n: int = 8) -> str:
    return "[" + ", ".join(map(str, items[:n])) + (", ...]" if len(items) > n else "]")

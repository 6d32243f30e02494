"""Static verdicts per BatchNorm channel, from the layer's own parameters and running statistics.

Under its running statistics the pre-activation of channel k is roughly Normal(beta_k, s_k^2) with
    s_k = |gamma_k| * sqrt(rv_k / (rv_k + eps)),
so after a ReLU it fires with probability about Phi(z_k), z_k = beta_k / s_k (Feng et al. 2023,
"Revisiting Pre-training in Audio-Visual Learning"; the z criterion is avdiag's sharpening of the
paper's |gamma|, |beta| test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from avdiag.locate import BNLayer
from avdiag.measure.thresholds import Thresholds
from avdiag.results import finite


@dataclass
class ChannelStats:
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    scale: np.ndarray  # s
    z: np.ndarray  # beta / s, +-inf where s == 0
    fire_prob: np.ndarray  # Phi(z)
    filter_norm: np.ndarray | None  # L2 norm of each feeding conv filter

    def to_dict(self) -> dict[str, list]:
        out = {k: _floats(getattr(self, k)) for k in
               ("gamma", "beta", "running_mean", "running_var", "scale", "z", "fire_prob")}
        if self.filter_norm is not None:
            out["filter_norm"] = _floats(self.filter_norm)
        return out


@dataclass
class LayerVerdicts:
    layer: BNLayer
    stats: ChannelStats
    dead: list[int]
    abnormal: list[int]
    constant: list[int]
    low_gain: list[int]
    collapsed: list[int]
    nonfinite: list[int]
    possibly_dead: list[int]  # would be dead if an activation follows (activation unknown)

    @property
    def worst_z(self) -> float | None:
        finite = self.stats.z[~np.isnan(self.stats.z)]
        return float(finite.min()) if finite.size else None


def channel_stats(layer: BNLayer, values: dict[str, np.ndarray], filter_norm: np.ndarray | None) -> ChannelStats:
    c = layer.channels
    gamma = values.get(layer.params.get("weight", ""), np.ones(c))
    beta = values.get(layer.params.get("bias", ""), np.zeros(c))
    rm = values[layer.params["running_mean"]]
    rv = values[layer.params["running_var"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.abs(gamma) * np.sqrt(rv / (rv + layer.eps))
        z = np.where(scale > 0, beta / scale, np.where(beta > 0, np.inf, -np.inf))
        z = np.where(np.isnan(scale) | np.isnan(beta), np.nan, z)
    return ChannelStats(gamma, beta, rm, rv, scale, z, ndtr(z), filter_norm)


def judge(layer: BNLayer, stats: ChannelStats, t: Thresholds) -> LayerVerdicts:
    finite = np.isfinite(stats.gamma) & np.isfinite(stats.beta) & np.isfinite(stats.running_mean) \
        & np.isfinite(stats.running_var) & (stats.running_var >= 0)
    constant = finite & (stats.scale < t.constant_scale)
    silent = finite & ((stats.z < t.dead_z) | (constant & (stats.beta <= t.constant_scale)))
    abnormal = finite & (np.abs(stats.gamma) < t.abnormal) & (np.abs(stats.beta) < t.abnormal)
    low_gain = finite & (np.abs(stats.gamma) < t.low_gain)
    collapsed = np.zeros(layer.channels, dtype=bool)
    if stats.filter_norm is not None and stats.filter_norm.size == layer.channels:
        median = float(np.median(stats.filter_norm))
        collapsed = stats.filter_norm <= max(t.collapsed_filter * median, 1e-30)
    dead = silent if layer.can_die else np.zeros_like(silent)
    possibly = silent if layer.feeds_activation == "unknown" else np.zeros_like(silent)
    return LayerVerdicts(layer, stats, _idx(dead), _idx(abnormal), _idx(constant), _idx(low_gain),
                         _idx(collapsed), _idx(~finite), _idx(possibly))


def _idx(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


def _floats(a: np.ndarray) -> list:
    return [json_float(v) for v in a.tolist()] if a.dtype.kind == "f" else a.tolist()


def json_float(v: float | None) -> float | None:
    """JSON has no NaN or infinities: non-finite floats are written as null (see avdiag.results)."""
    return finite(v)

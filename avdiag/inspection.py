"""`inspect_checkpoint`: load -> locate -> static measurement, as one typed result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avdiag import __version__, findings as F
from avdiag.findings import Finding
from avdiag.load import Checkpoint, load_checkpoint, sha256_of
from avdiag.locate import Layout, Located, locate, parse_overrides
from avdiag.measure.integrity import scan_tensors
from avdiag.measure.static import LayerVerdicts, channel_stats, json_float, judge
from avdiag.measure.thresholds import Thresholds

SCHEMA_VERSION = "1.0"


@dataclass
class ModalitySummary:
    name: str
    prefix: str | None
    n_bn_layers: int
    n_bn_channels: int
    n_dead: int
    n_abnormal: int
    n_constant: int
    n_low_gain: int
    n_collapsed: int
    n_nonfinite: int
    n_possibly_dead: int
    n_activation_known: int  # channels whose activation came from graph/architecture/name, not unknown
    worst_z: float | None
    worst_layer: str | None

    @property
    def dead_ratio(self) -> float:
        return self.n_dead / self.n_bn_channels if self.n_bn_channels else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "name"}
        d["worst_z"] = json_float(self.worst_z)
        d["dead_ratio"] = self.dead_ratio
        return d


@dataclass
class CheckpointSummary:
    path: str
    format: str
    sha256: str | None
    size_bytes: int
    n_tensors: int
    n_elements: int
    unwrapped: list[dict[str, str]]
    extras: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class InspectResult:
    """What `avdiag inspect` found. ``to_dict()`` is the JSON report; ``to_frame()`` one row a layer."""

    checkpoint: CheckpointSummary
    layout: Layout
    thresholds: Thresholds
    layers: list[LayerVerdicts]
    modalities: dict[str, ModalitySummary]
    findings: list[Finding]
    nonfinite_tensors: dict[str, int] = field(default_factory=dict)

    @property
    def n_dead(self) -> int:
        return sum(m.n_dead for m in self.modalities.values())

    @property
    def n_channels(self) -> int:
        return sum(m.n_bn_channels for m in self.modalities.values())

    def summary_line(self) -> str:
        per = ", ".join(f"{m.name} {m.n_dead}/{m.n_bn_channels}" for m in self.modalities.values())
        nan = f"; {len(self.nonfinite_tensors)} tensor(s) with NaN/Inf" if self.nonfinite_tensors else ""
        return (f"{self.n_dead} dead of {self.n_channels} BatchNorm channels in {len(self.layers)} layers"
                f"{' (' + per + ')' if per else ''}{nan}")

    def to_dict(self, per_channel: bool = False) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "avdiag", "version": __version__, "command": "inspect"},
            "checkpoint": self.checkpoint.to_dict(),
            "layout": self.layout.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "summary": {"n_bn_layers": len(self.layers), "n_bn_channels": self.n_channels,
                        "n_dead": self.n_dead, "n_findings": len(self.findings),
                        "nonfinite_tensors": dict(self.nonfinite_tensors), "text": self.summary_line()},
            "modalities": {name: m.to_dict() for name, m in self.modalities.items()},
            "layers": [_layer_dict(v, per_channel) for v in self.layers],
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_frame(self):
        """One row per BatchNorm layer (pandas DataFrame)."""
        import pandas as pd

        rows = []
        for v in self.layers:
            d = _layer_dict(v, per_channel=False)
            for key in ("dead_channels", "abnormal_channels", "constant_channels", "low_gain_channels",
                        "collapsed_filter_channels", "nonfinite_channels", "possibly_dead_channels"):
                d["n_" + key.replace("_channels", "")] = len(d.pop(key))
            rows.append(d)
        return pd.DataFrame(rows)


def _layer_dict(v: LayerVerdicts, per_channel: bool) -> dict[str, Any]:
    layer = v.layer
    d = {
        "name": layer.name,
        "modality": layer.modality,
        "channels": layer.channels,
        "feeds_activation": layer.feeds_activation,
        "activation": layer.activation,
        "activation_source": layer.activation_source,
        "conv": layer.conv,
        "conv_source": layer.conv_source,
        "eps": layer.eps,
        "eps_source": layer.eps_source,
        "dead_channels": v.dead,
        "abnormal_channels": v.abnormal,
        "constant_channels": v.constant,
        "low_gain_channels": v.low_gain,
        "collapsed_filter_channels": v.collapsed,
        "nonfinite_channels": v.nonfinite,
        "possibly_dead_channels": v.possibly_dead,
        "worst_z": json_float(v.worst_z),
        "min_fire_prob": json_float(float(np.nanmin(v.stats.fire_prob)) if layer.channels else None),
    }
    if per_channel:
        d["per_channel"] = v.stats.to_dict()
    return d


def inspect_checkpoint(path: str | Path, *, thresholds: Thresholds | None = None,
                       modality: dict[str, str] | list[str] | None = None, bn_eps: float | None = None,
                       assume_activation: str | None = None, allow_globals: list[str] | tuple[str, ...] = (),
                       unsafe: bool = False, hash_file: bool = True) -> InspectResult:
    """Load ``path`` safely and scan every BatchNorm channel statically.

    ``modality`` maps modality names to name prefixes (``{"audio": "audio_net"}`` or
    ``["audio=audio_net"]``); without it the research layouts are detected. ``hash_file=False``
    skips the SHA-256 (``checkpoint.sha256`` is then None), which bounds the run time on files that
    the page cache serves faster than SHA-256 can digest them. Raises
    :class:`avdiag.errors.AvdiagError` subclasses for unreadable or refused files.
    """
    thresholds = thresholds or Thresholds()
    overrides = parse_overrides(modality) if isinstance(modality, list) else (
        parse_overrides([f"{k}={v}" for k, v in modality.items()]) if modality else None)
    ckpt = load_checkpoint(path, allow_globals=allow_globals, unsafe=unsafe)
    located = locate(ckpt, modality_overrides=overrides, bn_eps=bn_eps, assume_activation=assume_activation)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_of, ckpt.files) if hash_file else None  # overlaps the tensor scan
        verdicts, scan = _measure(ckpt, located, thresholds)
        sha = digest.result() if digest else None
    summary = CheckpointSummary(str(ckpt.path), ckpt.format, sha, sum(f.stat().st_size for f in ckpt.files),
                                scan.n_tensors, scan.n_elements, [u.to_dict() for u in ckpt.unwrapped], ckpt.extras)
    modalities = _summarise(verdicts, located.layout)
    return InspectResult(summary, located.layout, thresholds, verdicts, modalities,
                         _findings(verdicts, scan.nonfinite, thresholds), scan.nonfinite)


def _measure(ckpt: Checkpoint, located: Located, t: Thresholds):
    keep = {name for layer in located.layers for name in layer.params.values()}
    banks = {layer.conv + ".weight" for layer in located.layers if layer.conv}
    scan = scan_tensors(ckpt.tensors, keep, banks)
    verdicts = []
    for layer in located.layers:
        norms = scan.filter_norms.get(layer.conv + ".weight") if layer.conv else None
        verdicts.append(judge(layer, channel_stats(layer, scan.kept, norms), t))
    return verdicts, scan


def _summarise(verdicts: list[LayerVerdicts], layout: Layout) -> dict[str, ModalitySummary]:
    order = list(layout.modalities) + sorted({v.layer.modality for v in verdicts} - set(layout.modalities))
    out = {}
    for name in order:
        group = [v for v in verdicts if v.layer.modality == name]
        worst = min((v for v in group if v.worst_z is not None), key=lambda v: v.worst_z, default=None)
        out[name] = ModalitySummary(
            name, layout.modalities.get(name), len(group), sum(v.layer.channels for v in group),
            sum(len(v.dead) for v in group), sum(len(v.abnormal) for v in group),
            sum(len(v.constant) for v in group), sum(len(v.low_gain) for v in group),
            sum(len(v.collapsed) for v in group), sum(len(v.nonfinite) for v in group),
            sum(len(v.possibly_dead) for v in group),
            sum(v.layer.channels for v in group if v.layer.feeds_activation != "unknown"),
            worst.worst_z if worst else None, worst.layer.name if worst else None)
    return out


def _findings(verdicts: list[LayerVerdicts], nonfinite: dict[str, int], t: Thresholds) -> list[Finding]:
    out = [F.finding(F.NONFINITE, name, f"{name}: {n} NaN/Inf value(s)") for name, n in nonfinite.items()]
    if not verdicts:
        out.append(F.finding(F.NO_BATCHNORM, "", "no BatchNorm layer (running_mean/running_var) found"))
    for v in verdicts:
        name, c, src = v.layer.name, v.layer.channels, v.layer.activation_source
        checks = [
            (F.DEAD, v.dead, f"{{n}}/{c} channels dead before {v.layer.activation} (z < {t.dead_z:g}, "
                             f"or constant output <= {t.constant_scale:g}; activation from {src})"),
            (F.ABNORMAL, v.abnormal, f"{{n}}/{c} channels with |gamma| and |beta| < {t.abnormal:g}"),
            (F.COLLAPSED, v.collapsed, f"{{n}}/{c} feeding conv filters ({v.layer.conv}) are ~0"),
            (F.CONSTANT, v.constant, f"{{n}}/{c} channels constant (s < {t.constant_scale:g})"),
            (F.LOW_GAIN, v.low_gain, f"{{n}}/{c} channels with |gamma| < {t.low_gain:g}"),
            (F.POSSIBLY_DEAD, v.possibly_dead, f"{{n}}/{c} channels would be dead if an activation follows "
                                               f"(unknown here; pass --assume-activation relu to count them)"),
        ]
        for rule_id, channels, text in checks:
            if channels:
                out.append(F.finding(rule_id, name, f"{name}: " + text.format(n=len(channels))
                                     + f" {_preview(channels)}"))
    return out


def _preview(channels: list[int], n: int = 8) -> str:
    head = ", ".join(map(str, channels[:n]))
    return f"[{head}{', ...' if len(channels) > n else ''}]"

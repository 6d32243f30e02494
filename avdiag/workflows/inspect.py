"""`avdiag inspect`: load -> locate -> static scan (-> activation probe on data), as one typed result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from avdiag import findings
from avdiag.errors import ModelError
from avdiag.findings import Finding
from avdiag.load import Checkpoint
from avdiag.locate import Layout, Located
from avdiag.progress import ProgressFactory, no_progress
from avdiag.results import CheckpointRef, envelope
from avdiag.measure.activity import Agreement, MeasuredLayer, agreement, approximate_verdicts, judge_activity
from avdiag.measure.integrity import scan_tensors
from avdiag.measure.probe import ProbeThresholds
from avdiag.measure.probe import probe as run_probe
from avdiag.measure.dormant import DEFAULT_TAU, DormantCollector, DormantReport, dormant_findings
from avdiag.measure.layernorm import LayerNormScan, scan_layernorms
from avdiag.measure.static import LayerVerdicts, channel_stats, json_float, judge
from avdiag.measure.thresholds import Thresholds
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.subject import LoadOptions, Subject

@dataclass
class ModalityScan:
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
    activations: dict[str, int] = field(default_factory=dict)  # what the BNs feed -> channels ("?" unknown)
    n_measured_dead: int | None = None  # with a probe
    n_rarely_active: int | None = None
    agreement: Agreement | None = None

    @property
    def dead_ratio(self) -> float:
        return self.n_dead / self.n_bn_channels if self.n_bn_channels else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "name"}
        d["worst_z"] = json_float(self.worst_z)
        d["dead_ratio"] = self.dead_ratio
        if self.agreement is None:
            for key in ("n_measured_dead", "n_rarely_active", "agreement"):
                d.pop(key)
        else:
            d["agreement"] = self.agreement.to_dict()
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
class ProbeSummary:
    data: str
    model: str
    device: str
    amp: bool
    samples: int
    batches: int
    thresholds: ProbeThresholds
    agreement: Agreement
    missing_layers: list[str]
    precision: dict[str, Any] = field(default_factory=dict)  # amp, amp_dtype, tf32, float64 of the run
    approximate_verdicts: list[str] = field(default_factory=list)  # std-based verdicts under autocast
    fed: str = ""  # which modalities of the data the model was given, e.g. "visual ...; audio unused"

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "model": self.model, "device": self.device, "amp": self.amp, "fed": self.fed,
                "samples": self.samples, "batches": self.batches, "thresholds": self.thresholds.to_dict(),
                "agreement": self.agreement.to_dict(), "missing_layers": self.missing_layers,
                **self.precision, "approximate_verdicts": self.approximate_verdicts}


@dataclass
class InspectResult:
    """What `avdiag inspect` found. ``to_dict()`` is the JSON report; ``to_frame()`` one row a layer."""

    checkpoint: CheckpointSummary
    layout: Layout
    thresholds: Thresholds
    layers: list[LayerVerdicts]
    modalities: dict[str, ModalityScan]
    findings: list[Finding]
    nonfinite_tensors: dict[str, int] = field(default_factory=dict)
    probe: ProbeSummary | None = None
    measured: dict[str, MeasuredLayer] = field(default_factory=dict)  # layer name -> probe verdicts
    data: dict[str, Any] | None = None  # with a probe: DataSource.report() (layout, skipped rows)
    dormant: DormantReport | None = None  # with a probe: ReDo dormant units of non-BN layers
    layernorm: LayerNormScan | None = None  # the static LayerNorm scan, when the checkpoint has LayerNorms

    @property
    def n_dead(self) -> int:
        return sum(m.n_dead for m in self.modalities.values())

    @property
    def n_channels(self) -> int:
        return sum(m.n_bn_channels for m in self.modalities.values())

    def summary_line(self) -> str:
        per = ", ".join(f"{m.name} {m.n_dead}/{m.n_bn_channels}" for m in self.modalities.values())
        nan = f"; {len(self.nonfinite_tensors)} tensor(s) with NaN/Inf" if self.nonfinite_tensors else ""
        measured = ""
        if self.probe:
            n = sum(len(m.dead) for m in self.measured.values())
            measured = f"; measured dead {n} on {self.probe.samples} samples"
            if self.dormant is not None and self.dormant.layers:
                d = self.dormant
                measured += f"; {d.n_dormant}/{d.n_units} dormant units (tau {d.tau:g})"
        norms = ""
        if self.layernorm is not None:
            t = self.layernorm.totals()
            norms = f"; {t['n_layers']} LayerNorm layers ({t['n_constant']} constant features)"
        return (f"{self.n_dead} dead of {self.n_channels} BatchNorm channels in {len(self.layers)} layers"
                f"{' (' + per + ')' if per else ''}{self._undecided_text()}{norms}{measured}{nan}")

    @property
    def n_undecided(self) -> int:
        """Channels that are dead if an activation follows their BN, which nothing here tells."""
        return sum(m.n_possibly_dead for m in self.modalities.values())

    def _undecided_text(self) -> str:
        if not self.n_undecided:
            return ""
        return (f"; {self.n_undecided} undecided (what their BN feeds is unknown: "
                "--assume-activation relu or --model decides)")

    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.checkpoint.path, self.checkpoint.format, self.checkpoint.sha256)

    def summary(self) -> dict[str, Any]:
        return {"n_bn_layers": len(self.layers), "n_bn_channels": self.n_channels, "n_dead": self.n_dead,
                "n_undecided": self.n_undecided, "n_findings": len(self.findings),
                "nonfinite_tensors": dict(self.nonfinite_tensors),
                "text": self.summary_line()}

    def to_dict(self, per_channel: bool = False) -> dict[str, Any]:
        return envelope("inspect", [self.ref()], self.summary(), {
            "checkpoint": self.checkpoint.to_dict(),
            "layout": self.layout.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "modalities": {name: m.to_dict() for name, m in self.modalities.items()},
            "layers": [_layer_dict(v, per_channel, self.measured.get(v.layer.name)) for v in self.layers],
            "findings": [f.to_dict() for f in self.findings],
            **({"probe": self.probe.to_dict()} if self.probe else {}),
            **({"data": self.data} if self.data is not None else {}),
            **({"dormant": self.dormant.to_dict(per_channel)} if self.dormant is not None else {}),
            **({"layernorm": self.layernorm.to_dict()} if self.layernorm is not None else {}),
        })

    def to_frame(self):
        """One row per BatchNorm layer (pandas DataFrame)."""
        import pandas as pd

        rows = []
        for v in self.layers:
            d = _layer_dict(v, per_channel=False, measured=self.measured.get(v.layer.name))
            for key in ("fire_rate", "output_mean", "output_std", "output_max", "nonfinite_rate"):
                d.pop(key, None)
            for key in ("measured_dead_channels", "rarely_active_channels", "measured_constant_channels",
                        "measured_nonfinite_channels", "predicted_not_measured", "measured_not_predicted"):
                if key in d:
                    d["n_" + key.replace("_channels", "")] = len(d.pop(key))
            for key in ("dead_channels", "abnormal_channels", "constant_channels", "low_gain_channels",
                        "collapsed_filter_channels", "nonfinite_channels", "possibly_dead_channels"):
                d["n_" + key.replace("_channels", "")] = len(d.pop(key))
            rows.append(d)
        return pd.DataFrame(rows)


def _layer_dict(v: LayerVerdicts, per_channel: bool, measured: MeasuredLayer | None = None) -> dict[str, Any]:
    layer = v.layer
    d = {
        "name": layer.name,
        "kind": "batchnorm",
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
    if measured is not None:
        d.update(measured.to_dict())
    if per_channel:
        d["per_channel"] = v.stats.to_dict()
    return d


def inspect(checkpoint: str | Path | Subject, *, thresholds: Thresholds | None = None,
            data: DataSource | None = None, probe_thresholds: ProbeThresholds | None = None,
            hash_file: bool = True, load: LoadOptions | None = None,
            progress: ProgressFactory = no_progress, model: str | None = None,
            dormant_tau: float | None = DEFAULT_TAU) -> InspectResult:
    """Scan every BatchNorm channel of ``checkpoint`` statically; with ``data``, also run its model on
    the data and measure every channel's activity next to the static prediction.

    What each BN feeds comes from the model where one is available: ``model`` (pkg.module:factory,
    default the data's ``--model``), else the built-in architecture when names alone leave a layer
    undecided (:func:`read_model_consumers`).

    ``checkpoint`` is a path (opened with ``load``: allowed globals, modality prefixes, BN eps, assumed
    activation) or an open :class:`Subject`. ``hash_file=False`` skips the SHA-256
    (``checkpoint.sha256`` is then None), which bounds the run time on files that the page cache serves
    faster than SHA-256 can digest them. Raises :class:`avdiag.errors.AvdiagError` subclasses for
    unreadable or refused files, and :class:`avdiag.errors.ModelError` when no model can run on the data.
    """
    subject = Subject.of(checkpoint, load)
    factory = model or (data.model if data is not None else None)
    result = scan(subject, thresholds or Thresholds(), hash_file=hash_file, model=factory)
    if data is not None:
        _run_probe(result, subject, data, probe_thresholds or ProbeThresholds(), progress, dormant_tau)
    return result


def scan(subject: Subject, thresholds: Thresholds, hash_file: bool = True,
         model: str | None = None) -> InspectResult:
    """The static part of an inspection, on an open Subject (``model``: see :func:`read_model_consumers`)."""
    read_model_consumers(subject, model)
    ckpt, located = subject.ckpt, subject.located
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(subject.sha256) if hash_file else None  # overlaps the tensor scan
        verdicts, tensor_scan = _measure(ckpt, located, thresholds)
        sha = digest.result() if digest else None
    summary = CheckpointSummary(str(ckpt.path), ckpt.format, sha, sum(f.stat().st_size for f in ckpt.files),
                                tensor_scan.n_tensors, tensor_scan.n_elements, [u.to_dict() for u in ckpt.unwrapped],
                                ckpt.extras)
    modalities = _summarise(verdicts, located.layout)
    norms = scan_layernorms(ckpt.tensors, located.layout.modality_of, {layer.name for layer in located.layers})
    found = _findings(verdicts, tensor_scan.nonfinite, thresholds, scanned_norms=bool(norms.layers))
    result = InspectResult(summary, located.layout, thresholds, verdicts, modalities, found, tensor_scan.nonfinite)
    if norms.layers:
        result.layernorm = norms
        result.findings.extend(norms.findings())
    return result


def read_model_consumers(subject: Subject, factory: str | None = None) -> str | None:
    """Read what each BN feeds from the model itself, into ``subject.located``: from ``factory``'s model
    (a ModelError when it cannot be built), else from the built-in architecture's, and then only when
    some layer's activation rests on names alone. Returns the model's source, None when none was read."""
    from avdiag.locate.consumers import apply_model_facts, model_facts, needs_model

    located = subject.located
    if located.consumers_from is not None and (factory is None or located.consumers_from.endswith(factory)):
        return located.consumers_from or None  # read before ("" : no model could be built)
    if factory is None and not needs_model(located.layers):
        return None
    try:
        resolved = subject.model(factory)
    except ModelError:
        if factory is not None:
            raise
        located.consumers_from = ""
        return None
    facts, how = model_facts(resolved)
    apply_model_facts(located.layers, facts, f"{resolved.source} ({how})", explicit=factory is not None)
    located.consumers_from = resolved.source
    return resolved.source


def _run_probe(result: InspectResult, subject: Subject, data: DataSource, thresholds: ProbeThresholds,
               progress: ProgressFactory, dormant_tau: float | None = DEFAULT_TAU) -> None:
    resolved = subject.model_for(data)
    device = data.torch_device()
    dormant = None if dormant_tau is None else DormantCollector(dormant_tau, subject.located.layout.modality_of)
    with progress(data.n_samples(), "probing") as advance:
        run = run_probe(resolved, subject.located.layers, data.loader(), device, data.amp, advance, tf32=data.tf32,
                        collectors=[dormant] if dormant is not None else [])
    result.dormant = dormant.result() if dormant is not None else None
    for v in result.layers:
        if v.layer.name in run.activity:
            result.measured[v.layer.name] = judge_activity(v, run.activity[v.layer.name], thresholds)
    measured = list(result.measured.values())
    result.data = data.report()
    result.probe = ProbeSummary(data.name, run.model_source, run.device, run.amp, run.samples, run.batches,
                                thresholds, agreement(measured), run.missing_layers,
                                {**run.precision_dict(), "float64": data.float64},
                                approximate_verdicts(run.amp, measured), resolved.fed(tuple(data.modalities)))
    _summarise_measured(result)
    result.findings.extend(_probe_findings(result))
    if result.dormant is not None:
        result.findings.extend(dormant_findings(result.dormant))


def _summarise_measured(result: InspectResult) -> None:
    for name, m in result.modalities.items():
        group = [result.measured[v.layer.name] for v in result.layers
                 if v.layer.modality == name and v.layer.name in result.measured]
        m.n_measured_dead = sum(len(g.dead) for g in group)
        m.n_rarely_active = sum(len(g.rarely_active) for g in group)
        m.agreement = agreement(group)


def _probe_findings(result: InspectResult) -> list[Finding]:
    out = []
    for name, m in result.measured.items():
        if m.nonfinite:
            out.append(findings.finding(findings.MEASURED_NONFINITE, name,
                                        f"{name}: {len(m.nonfinite)} channels output NaN or Inf on the data "
                                        f"{_preview(m.nonfinite)}; their measured verdicts are withheld"))
        if m.dead:
            out.append(findings.finding(findings.MEASURED_DEAD, name,
                                        f"{name}: {len(m.dead)} channels never fire on the data (<= "
                                        f"{result.probe.thresholds.dead_rate:g} of positions) {_preview(m.dead)}"))
        if m.measured_only or m.predicted_only:
            out.append(findings.finding(findings.PREDICTION_MISMATCH, name,
                                 f"{name}: static prediction and measurement disagree: predicted only "
                                 f"{_preview(m.predicted_only)}, measured only {_preview(m.measured_only)}"))
    for name in result.probe.missing_layers:
        out.append(findings.finding(findings.NOT_PROBED, name,
                                    f"{name}: the model never ran this BN layer on the data"))
    return out


def _measure(ckpt: Checkpoint, located: Located, t: Thresholds):
    keep = {name for layer in located.layers for name in layer.params.values()}
    banks = {layer.conv + ".weight" for layer in located.layers if layer.conv}
    scan = scan_tensors(ckpt.tensors, keep, banks)
    verdicts = []
    for layer in located.layers:
        norms = scan.filter_norms.get(layer.conv + ".weight") if layer.conv else None
        verdicts.append(judge(layer, channel_stats(layer, scan.kept, norms), t))
    return verdicts, scan


def _summarise(verdicts: list[LayerVerdicts], layout: Layout) -> dict[str, ModalityScan]:
    order = list(layout.modalities) + sorted({v.layer.modality for v in verdicts} - set(layout.modalities))
    out = {}
    for name in order:
        group = [v for v in verdicts if v.layer.modality == name]
        worst = min((v for v in group if v.worst_z is not None), key=lambda v: v.worst_z, default=None)
        out[name] = ModalityScan(
            name, layout.modalities.get(name), len(group), sum(v.layer.channels for v in group),
            sum(len(v.dead) for v in group), sum(len(v.abnormal) for v in group),
            sum(len(v.constant) for v in group), sum(len(v.low_gain) for v in group),
            sum(len(v.collapsed) for v in group), sum(len(v.nonfinite) for v in group),
            sum(len(v.possibly_dead) for v in group),
            sum(v.layer.channels for v in group if v.layer.feeds_activation != "unknown"),
            worst.worst_z if worst else None, worst.layer.name if worst else None, _activations(group))
    return out


def _activations(group: list[LayerVerdicts]) -> dict[str, int]:
    """Channels per kind of what their BN feeds (relu, prelu, gelu, add, ...; "?" where unknown)."""
    out: dict[str, int] = {}
    for v in group:
        kind = v.layer.activation if v.layer.feeds_activation != "unknown" else "?"
        out[kind or "?"] = out.get(kind or "?", 0) + v.layer.channels
    return dict(sorted(out.items()))


def _findings(verdicts: list[LayerVerdicts], nonfinite: dict[str, int], t: Thresholds,
              scanned_norms: bool = False) -> list[Finding]:
    out = [findings.finding(findings.NONFINITE, name, f"{name}: {n} NaN/Inf value(s)") for name, n in nonfinite.items()]
    if not verdicts and not scanned_norms:  # a LayerNorm model still had something to look at
        out.append(findings.finding(findings.NO_BATCHNORM, "", "no BatchNorm layer (running_mean/running_var) found"))
    for v in verdicts:
        name, c, src = v.layer.name, v.layer.channels, v.layer.activation_source
        checks = [
            (findings.DEAD, v.dead, f"{{n}}/{c} channels dead before {v.layer.activation} (z < {t.dead_z:g}, "
                             f"or constant output <= {t.constant_scale:g}; activation from {src})"),
            (findings.ABNORMAL, v.abnormal, f"{{n}}/{c} channels with |gamma| and |beta| < {t.abnormal:g}"),
            (findings.COLLAPSED, v.collapsed, f"{{n}}/{c} feeding conv filters ({v.layer.conv}) are ~0"),
            (findings.CONSTANT, v.constant, f"{{n}}/{c} channels constant (s < {t.constant_scale:g})"),
            (findings.LOW_GAIN, v.low_gain, f"{{n}}/{c} channels with |gamma| < {t.low_gain:g}"),
            (findings.POSSIBLY_DEAD, v.possibly_dead, f"{{n}}/{c} channels would be dead if an activation follows "
                                               f"(unknown here; --assume-activation relu or --model decides)"),
        ]
        for rule_id, channels, text in checks:
            if channels:
                out.append(findings.finding(rule_id, name, f"{name}: " + text.format(n=len(channels))
                                     + f" {_preview(channels)}"))
    return out


def _preview(channels: list[int], n: int = 8) -> str:
    head = ", ".join(map(str, channels[:n]))
    return f"[{head}{', ...' if len(channels) > n else ''}]"

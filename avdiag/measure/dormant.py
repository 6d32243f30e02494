"""Dormant units on data, for any layer kind (ReDo: Sokar, Agarwal, Castro, Evci, "The Dormant Neuron
Phenomenon in Deep Reinforcement Learning", ICML 2023).

For unit i of a layer's activation output, ``m_i`` = mean |a_i| over the batch (and over token or
spatial positions); its score is ``s_i = m_i / (mean_j m_j + 1e-9)``, the layer's mean of those
values normalising it. A unit is tau-dormant when ``s_i <= tau``. ``tau = 0`` asks for units whose
output is exactly zero: there the test is ``s_i <= zero_tolerance`` (1e-6), since the normalised
score of an all-zero unit is 0 up to rounding only. The paper's thresholds are 0 (the default here),
0.025 and 0.1.

Which outputs are units (:class:`DormantCollector` hooks them on the model's modules):

- ``mlp``: the output of an activation module (GELU, ReLU, SiLU, ... any of :data:`ACTIVATIONS`)
  fed by a Linear layer or producing token features (..., D): units along the last axis;
- ``conv``: the output of an activation fed by a convolution or a norm over channels, or any
  activation output of 4 or more dimensions: units are the channels (axis 1);
- ``attention``: the output of ``nn.MultiheadAttention`` (its output projection) and of Linear
  layers named as attention projections (``q``, ``k``, ``v``, ``qkv``, ``q_proj``, ``out_proj``,
  ``query``, ``proj`` inside an ``attn`` module, ...): units along the last axis.

An activation whose input is the output of the BatchNorm registered just before it (``conv, bn, act``)
is left to the BN probe (:mod:`avdiag.measure.probe` measures how often each BN channel fires, which is
the same question), so nothing is counted twice; the same activation called on something else (a
ResNet block's ReLU after the residual add) is measured.
A module called more than once in one forward pass (a ResNet block's shared ReLU) is one layer per
call, named ``name#1``, ``name#2``, ...

Statistics stay on the model's device (per hooked output and batch, one reduction to a float32 sum
of |a| per unit; no host synchronisation) until :meth:`DormantCollector.result`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from avdiag.findings import WARNING, Finding
from avdiag.results import finite

PAPER_TAUS = (0.0, 0.025, 0.1)
DEFAULT_TAU = 0.0
ZERO_TOLERANCE = 1e-6
_EPS = 1e-9  # the paper's guard in the normalisation
_FOLD_EVERY = 64  # batches whose float32 sums wait on the device before they are added up in float64

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.GLU,
)
_CONV_LIKE = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
              nn.modules.instancenorm._InstanceNorm)
_ATTENTION_LEAVES = {"q", "k", "v", "qkv", "q_proj", "k_proj", "v_proj", "qkv_proj", "out_proj", "query", "key",
                     "value", "in_proj", "o_proj"}
_ATTENTION_PARENTS = ("attn", "attention")

ModalityOf = Callable[[str], str]

# The finding (and `check` rule) id: stable, never renamed.
DORMANT_UNITS = "dormant-units"
DORMANT_UNITS_SEVERITY = WARNING
DORMANT_UNITS_DESCRIPTION = ("units of an activation, MLP, conv or attention layer that are tau-dormant on the probed "
                             "data (ReDo score <= tau)")


@dataclass
class DormantLayer:
    """One measured layer: its units' mean |activation| and ReDo scores, and the tau-dormant units."""

    name: str
    kind: str  # mlp / conv / attention
    modality: str
    module_type: str  # the hooked module's class (GELU, ReLU, Linear, MultiheadAttention, ...)
    mean_abs: np.ndarray
    scores: np.ndarray
    positions: int  # values per unit seen (samples x tokens or spatial positions)
    dormant: list[int]
    nonfinite: list[int]  # units whose mean |a| is NaN or inf: no verdict

    @property
    def units(self) -> int:
        return len(self.scores)

    @property
    def min_score(self) -> float | None:
        ok = self.scores[np.isfinite(self.scores)]
        return float(ok.min()) if ok.size else None

    def to_dict(self, per_unit: bool = False) -> dict[str, Any]:
        d = {"name": self.name, "kind": self.kind, "modality": self.modality, "module_type": self.module_type,
             "units": self.units, "positions": self.positions, "n_dormant": len(self.dormant),
             "dormant_units": list(self.dormant), "nonfinite_units": list(self.nonfinite),
             "min_score": finite(self.min_score)}
        if per_unit:
            d["per_unit"] = {"score": [finite(float(x)) for x in self.scores],
                             "mean_abs": [finite(float(x)) for x in self.mean_abs]}
        return d


@dataclass
class DormantModality:
    name: str
    n_layers: int
    n_units: int
    n_dormant: int
    by_kind: dict[str, list[int]]  # kind -> [units, dormant]

    @property
    def ratio(self) -> float:
        return self.n_dormant / self.n_units if self.n_units else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_units": self.n_units, "n_dormant": self.n_dormant,
                "dormant_ratio": self.ratio,
                "by_kind": {k: {"units": u, "dormant": d} for k, (u, d) in self.by_kind.items()}}


@dataclass
class DormantReport:
    tau: float
    zero_tolerance: float
    layers: list[DormantLayer]
    left_to_bn_probe: int = 0  # activation calls fed by a BatchNorm: measured by the BN probe instead
    note: str | None = None  # why nothing could be measured, when so

    @property
    def n_units(self) -> int:
        return sum(layer.units for layer in self.layers)

    @property
    def n_dormant(self) -> int:
        return sum(len(layer.dormant) for layer in self.layers)

    def modalities(self) -> dict[str, DormantModality]:
        out: dict[str, DormantModality] = {}
        for layer in self.layers:
            m = out.setdefault(layer.modality, DormantModality(layer.modality, 0, 0, 0, {}))
            m.n_layers += 1
            m.n_units += layer.units
            m.n_dormant += len(layer.dormant)
            kind = m.by_kind.setdefault(layer.kind, [0, 0])
            kind[0] += layer.units
            kind[1] += len(layer.dormant)
        return out

    def summary_text(self) -> str:
        if not self.layers:
            return f"dormant units: nothing measured ({self.note or 'no activation, attention or MLP layer ran'})"
        per = ", ".join(f"{m.name} {m.n_dormant}/{m.n_units}" for m in self.modalities().values())
        return (f"dormant units (tau {self.tau:g}): {self.n_dormant} of {self.n_units} in {len(self.layers)} "
                f"layers ({per})")

    def to_dict(self, per_unit: bool = False) -> dict[str, Any]:
        return {"method": "redo", "tau": self.tau, "zero_tolerance": self.zero_tolerance,
                "n_layers": len(self.layers), "n_units": self.n_units, "n_dormant": self.n_dormant,
                "left_to_bn_probe": self.left_to_bn_probe, "note": self.note,
                "modalities": {name: m.to_dict() for name, m in self.modalities().items()},
                "layers": [layer.to_dict(per_unit) for layer in self.layers]}


def redo_scores(mean_abs: np.ndarray) -> np.ndarray:
    """s_i = m_i / (mean_j m_j + 1e-9), over a layer's finite unit means (ReDo's normalisation)."""
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    ok = np.isfinite(mean_abs)
    layer_mean = mean_abs[ok].mean() if ok.any() else np.nan
    return mean_abs / (layer_mean + _EPS)


def dormant_units(scores: np.ndarray, tau: float, zero_tolerance: float = ZERO_TOLERANCE) -> list[int]:
    """Units with ``score <= tau`` (``<= zero_tolerance`` when tau is 0); non-finite scores never are."""
    limit = tau if tau > 0 else zero_tolerance
    return [int(i) for i in np.flatnonzero(np.isfinite(scores) & (scores <= limit))]


def check_tau(tau: float) -> float:
    if not np.isfinite(tau) or not 0.0 <= tau < 1.0:
        raise ValueError(f"the dormant threshold tau must be in [0, 1), got {tau!r}")
    return float(tau)


@dataclass
class _Site:
    """One hooked module call: what it is and its running sums (None until it ran)."""

    name: str
    kind: str
    module_type: str
    axis: int  # the units' axis
    pending: list[torch.Tensor] = field(default_factory=list)  # per-batch sums of |a| (>= float32), not folded
    total: torch.Tensor | None = None  # per-unit sum of |a| over the folded batches, float64
    positions: int = 0

    def fold(self) -> None:
        """Add the pending per-batch sums into the float64 total (one stack and one sum)."""
        if self.pending:
            folded = torch.stack(self.pending).double().sum(dim=0)
            self.pending = []
            # not in place: under inference mode the first total is an inference tensor
            self.total = folded if self.total is None else self.total + folded


@dataclass
class _PassState:
    calls: dict[str, int] = field(default_factory=dict)  # module name -> calls in this forward pass
    # id of a BatchNorm output -> (a weak reference to it, the BN): an id alone could be a new tensor's
    # once the output is freed
    bn_outputs: dict[int, tuple[weakref.ref, nn.Module]] = field(default_factory=dict)


class DormantCollector:
    """Hooks on a model's activation, attention and projection modules that sum each unit's |output|.

    ``attach`` (inside an ExitStack that removes the hooks), run the model, then ``result``. Can share
    a forward pass with the BN probe (:func:`avdiag.measure.probe.probe`'s ``collectors``).
    """

    def __init__(self, tau: float = DEFAULT_TAU, modality_of: ModalityOf | None = None,
                 zero_tolerance: float = ZERO_TOLERANCE, leave_bn_fed: bool = True):
        self.tau = check_tau(tau)
        self.zero_tolerance = zero_tolerance
        self.modality_of = modality_of or (lambda _name: "model")
        self.leave_bn_fed = leave_bn_fed
        self._sites: dict[tuple[str, int], _Site | None] = {}  # None: left to the BN probe
        self._state = _PassState()
        self._passes = 0
        self.note: str | None = None

    def attach(self, model: nn.Module, prefix: str = "", stack: ExitStack | None = None) -> int:
        """Hook every unit-bearing module of ``model`` (names get ``prefix``); returns how many."""
        if isinstance(model, torch.fx.GraphModule):
            self.note = "an exported program's graph has no modules to hook"
            return 0
        handles = [model.register_forward_pre_hook(self._new_pass)]
        count = 0
        seen: set[int] = set()
        for parent_name, parent in model.named_modules():
            previous: nn.Module | None = None
            for leaf, module in parent.named_children():
                if id(module) in seen:  # shared under two parents: hooked once, under its first name
                    previous = module
                    continue
                seen.add(id(module))
                name = prefix + (f"{parent_name}.{leaf}" if parent_name else leaf)
                kind = _kind_of(module, leaf, parent_name, previous)
                previous_module, previous = previous, module
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and self.leave_bn_fed:
                    handles.append(module.register_forward_hook(self._remember_bn))
                if kind is None:
                    continue
                bn_before = previous_module if isinstance(previous_module, nn.modules.batchnorm._BatchNorm) else None
                handles.append(module.register_forward_hook(self._hook(name, kind, type(module).__name__, bn_before)))
                count += 1
        if stack is not None:
            for h in handles:
                stack.callback(h.remove)
        return count

    def _new_pass(self, _module: nn.Module, _inputs: Any) -> None:
        self._state = _PassState()
        self._passes += 1

    def _remember_bn(self, module: nn.Module, _inputs: Any, out: Any) -> None:
        # What feeds each activation is decided on the first pass; later passes need no BN outputs.
        if self._passes <= 1 and isinstance(out, torch.Tensor):
            self._state.bn_outputs[id(out)] = (weakref.ref(out), module)

    def _hook(self, name: str, kind: str, module_type: str, bn_before: nn.Module | None):
        def hook(_module: nn.Module, inputs: Any, out: Any) -> None:
            call = self._state.calls.get(name, 0)
            self._state.calls[name] = call + 1
            key = (name, call)
            site = self._sites.get(key, False)
            if site is False:
                site = self._sites[key] = self._new_site(name, kind, module_type, inputs, out, bn_before)
            if site is not None:
                _accumulate(site, out[0] if isinstance(out, tuple) else out)

        return hook

    def _new_site(self, name: str, kind: str, module_type: str, inputs: Any, out: Any,
                  bn_before: nn.Module | None) -> _Site | None:
        first = inputs[0] if isinstance(inputs, tuple) and inputs else None
        seen = self._state.bn_outputs.get(id(first)) if bn_before is not None else None
        if seen is not None and seen[0]() is first and seen[1] is bn_before:
            return None
        x = out[0] if isinstance(out, tuple) else out
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            return None
        if kind == "activation":  # fed by something else than a Linear or a conv: the shape decides
            kind = "conv" if x.dim() >= 4 else "mlp"
        axis = 1 if kind == "conv" and x.dim() >= 3 else x.dim() - 1
        return _Site(name, kind, module_type, axis)

    def result(self) -> DormantReport:
        calls: dict[str, int] = {}
        for name, call in self._sites:
            calls[name] = max(calls.get(name, 0), call + 1)
        layers = []
        for (name, call), site in self._sites.items():
            if site is not None:
                site.fold()
            if site is None or site.total is None:
                continue
            label = f"{name}#{call + 1}" if calls[name] > 1 else name
            mean_abs = (site.total / max(site.positions, 1)).cpu().numpy()
            scores = redo_scores(mean_abs)
            layers.append(DormantLayer(label, site.kind, self.modality_of(name), site.module_type, mean_abs, scores,
                                       site.positions, dormant_units(scores, self.tau, self.zero_tolerance),
                                       [int(i) for i in np.flatnonzero(~np.isfinite(mean_abs))]))
        left = sum(1 for s in self._sites.values() if s is None)
        return DormantReport(self.tau, self.zero_tolerance, layers, left, self.note)


def _kind_of(module: nn.Module, leaf: str, parent_name: str, previous: nn.Module | None) -> str | None:
    """mlp / conv / attention / activation (decided by the output's shape) for a hooked module, else None."""
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, nn.Linear):
        parent_leaf = parent_name.rsplit(".", 1)[-1].lower()
        in_attention = any(word in parent_leaf for word in _ATTENTION_PARENTS)
        if leaf.lower() in _ATTENTION_LEAVES or (leaf.lower() == "proj" and in_attention):
            return "attention"
        return None
    if not isinstance(module, ACTIVATIONS):
        return None
    if isinstance(previous, nn.Linear):
        return "mlp"
    if isinstance(previous, _CONV_LIKE):
        return "conv"
    return "activation"


@torch.no_grad()
def _accumulate(site: _Site, x: torch.Tensor) -> None:
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if x.numel() == 0:
        return
    dims = [d for d in range(x.dim()) if d != site.axis]
    # Per batch the per-unit sum of |a| in float32 (float64 under --float64); batches are summed in float64
    # when folded. On a GPU one L1-norm kernel costs least (launches dominate); on the CPU abs + sum runs
    # ~4x faster than it.
    wide = torch.promote_types(x.dtype, torch.float32)
    if not dims:
        sums = x.abs().to(wide)
    elif x.device.type == "cpu":
        sums = x.abs().sum(dim=dims, dtype=wide)
    else:
        sums = torch.linalg.vector_norm(x, ord=1, dim=dims, dtype=wide)
    site.pending.append(sums)
    site.positions += x.numel() // x.shape[site.axis]
    if len(site.pending) >= _FOLD_EVERY:
        site.fold()


def measure_dormant(model: nn.Module, batches: Iterable[Any], *, tau: float = DEFAULT_TAU,
                    modality_of: ModalityOf | None = None, call: Callable[[nn.Module, Any], Any] | None = None,
                    leave_bn_fed: bool = True) -> DormantReport:
    """Run ``model`` (eval mode, no gradients) over ``batches`` and measure its dormant units.

    ``call(model, batch)`` runs one batch (default: ``model(*batch)`` for a tuple or list, else
    ``model(batch)``)."""
    run = call or (lambda m, b: m(*b) if isinstance(b, (tuple, list)) else m(b))
    collector = DormantCollector(tau, modality_of, leave_bn_fed=leave_bn_fed)
    was_training = model.training
    model.eval()
    try:
        with ExitStack() as stack, torch.inference_mode():
            collector.attach(model, "", stack)
            for batch in batches:
                run(model, batch)
    finally:
        model.train(was_training)
    return collector.result()


def dormant_findings(report: DormantReport) -> list[Finding]:
    """One ``dormant-units`` finding per layer with tau-dormant units."""
    out = []
    for layer in report.layers:
        if layer.dormant:
            head = ", ".join(map(str, layer.dormant[:8])) + (", ..." if len(layer.dormant) > 8 else "")
            test = f"score <= {report.tau:g}" if report.tau > 0 else "output exactly 0"
            out.append(Finding(DORMANT_UNITS, DORMANT_UNITS_SEVERITY, layer.name,
                               f"{layer.name}: {len(layer.dormant)}/{layer.units} {layer.kind} units dormant on the "
                               f"data ({test}, ReDo) [{head}]"))
    return out

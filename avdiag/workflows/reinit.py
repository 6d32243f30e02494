"""`avdiag reinit`: rewrite a checkpoint with a registered method (ABRi, reset, re-learning, BN
recalibration, or one of your own), write it atomically in the input's format, and verify the written
file before reporting success.

The checkpoint is opened once (:class:`Subject`), scanned before, rewritten by the method
(:mod:`avdiag.rewrite.methods`), written (:func:`avdiag.load.write.write_checkpoint`), verified on the
temporary file (every other tensor bit-identical, the rewritten ones as intended, one finite forward
pass) and scanned again after it replaced the target.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from avdiag._version import __version__
from avdiag.errors import ModelError, UsageError, VerificationError
from avdiag.load import Checkpoint
from avdiag.locate.consumers import tensors_in
from avdiag.measure.thresholds import Thresholds
from avdiag.results import CheckpointRef, envelope, finite
from avdiag.rewrite import methods
from avdiag.rewrite.methods.abri import AbriOptions
from avdiag.rewrite.methods.recalibrate import RecalibrateOptions
from avdiag.rewrite.methods.relearn import RelearnOptions
from avdiag.rewrite.methods.reset import ResetOptions
from avdiag.rewrite.precision import autocast
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.inspect import InspectResult, scan
from avdiag.workflows.subject import LoadOptions, Subject

__all__ = ["AbriOptions", "RecalibrateOptions", "ReinitOptions", "ReinitResult", "RelearnOptions", "ResetOptions",
           "RewrittenTensor", "VerificationError", "reinit"]


@dataclass
class ReinitOptions:
    """Which rewrite, and how.

    ``method``: a registered method (``abri``, ``reset``, ``relearn``, ``recalibrate``, or one registered
    with :func:`avdiag.rewrite.methods.register`). ``settings``: that method's options
    (:class:`AbriOptions`, :class:`ResetOptions`, :class:`RelearnOptions`, :class:`RecalibrateOptions`);
    None = its defaults. ``modality``: restrict the rewrite to one modality (None: all of them).
    """

    method: str = "abri"
    settings: Any = None
    modality: str | None = None

    @classmethod
    def from_flags(cls, method: str, flags: dict[str, Any], modality: str | None = None) -> "ReinitOptions":
        """The options of the command line: ``flags`` maps option field names to values for every method
        at once; the chosen method takes those it knows, the others are left out."""
        return cls(method, methods.get(method).settings_from(flags), modality)

    def resolved(self, has_data: bool) -> tuple[methods.Method, Any]:
        """The registered method and its validated settings (one-line UsageError otherwise)."""
        method = methods.get(self.method)
        settings = method.settings(self.settings)
        method.validate(settings, has_data)
        return method, settings


@dataclass
class RewrittenTensor:
    """One tensor the rewrite changed or added: how many of its rows (channels) changed, its norm before
    (None for a new tensor) and after."""

    name: str
    channels_changed: int
    norm_before: float | None
    norm_after: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels_changed": self.channels_changed,
                "norm_before": finite(self.norm_before), "norm_after": finite(self.norm_after)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RewrittenTensor":
        before = d.get("norm_before")
        return cls(d["name"], int(d["channels_changed"]), None if before is None else float(before),
                   _float(d.get("norm_after")))


@dataclass
class ReinitResult:
    """What `avdiag reinit` wrote and checked. ``to_dict()`` is the JSON report; ``to_frame()`` one row per
    rewritten tensor."""

    source: CheckpointRef
    target: str | None  # None: nothing was in scope, nothing was written
    method: str
    parameters: dict[str, Any]
    changes: list[RewrittenTensor]
    dead_before: dict[str, int]
    dead_after: dict[str, int]
    verification: dict[str, Any]
    warnings: list[str]
    diagnosis: dict[str, Any] = field(default_factory=dict)
    revived_beyond_blend: dict[str, dict[str, list]] = field(default_factory=dict)  # layer -> channels, alpha
    still_dead: dict[str, list[int]] | None = None  # layer -> channels in scope the written file has dead
    data: dict[str, Any] | None = None  # DataSource.report() of the data used (layout, skipped rows); None without

    @property
    def n_still_dead(self) -> int:
        return sum(len(c) for c in (self.still_dead or {}).values())

    @property
    def n_revived(self) -> int:
        return sum(len(r["channels"]) for r in self.revived_beyond_blend.values())

    def summary_line(self) -> str:
        if self.target is None:
            return f"{self.method}: {self.warnings[0] if self.warnings else 'nothing in scope to rewrite'}"
        dead = ", ".join(f"{m} {self.dead_before.get(m, 0)} -> {self.dead_after.get(m, 0)}" for m in self.dead_before)
        forward = self.verification.get("forward")
        revived = f" ({self.n_revived} revived beyond the paper's blend)" if self.n_revived else ""
        return (f"{self._still_dead_text()}{self.method}: {len(self.changes)} tensors rewritten into {self.target}; "
                f"dead channels {dead}{revived}; verified ({self.verification['identical']} tensors bit-identical"
                f"{', forward ' + forward if forward else ''})")

    def _still_dead_text(self) -> str:
        if not self.n_still_dead:
            return ""
        layers = ", ".join(list(self.still_dead)[:3]) + (", ..." if len(self.still_dead) > 3 else "")
        return (f"{self.n_still_dead} channel(s) in scope still dead after the rewrite ({layers}): these "
                "options leave them dead (JSON still_dead); ")

    def summary(self) -> dict[str, Any]:
        return {"n_rewritten": len(self.changes), "n_dead_before": sum(self.dead_before.values()),
                "n_dead_after": sum(self.dead_after.values()), "n_revived_beyond_blend": self.n_revived,
                "n_still_dead": self.n_still_dead if self.still_dead is not None else None,
                "text": self.summary_line()}

    def to_dict(self) -> dict[str, Any]:
        return envelope("reinit", [self.source], self.summary(), {
            "source": self.source.to_dict(), "target": self.target, "method": self.method,
            "parameters": self.parameters, "diagnosis": self.diagnosis,
            "changes": [c.to_dict() for c in self.changes],
            "dead_before": self.dead_before, "dead_after": self.dead_after,
            "revived_beyond_blend": self.revived_beyond_blend, "still_dead": self.still_dead,
            "verification": self.verification, "warnings": self.warnings,
            **({"data": self.data} if self.data is not None else {})})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReinitResult":
        source = d["source"]
        return cls(CheckpointRef(source["path"], source.get("format"), source.get("sha256")), d["target"],
                   d["method"], dict(d.get("parameters") or {}),
                   [RewrittenTensor.from_dict(c) for c in d.get("changes") or []],
                   dict(d.get("dead_before") or {}), dict(d.get("dead_after") or {}),
                   dict(d.get("verification") or {}), list(d.get("warnings") or []), dict(d.get("diagnosis") or {}),
                   dict(d.get("revived_beyond_blend") or {}),
                   None if d.get("still_dead") is None else {k: list(v) for k, v in d["still_dead"].items()},
                   d.get("data"))

    def to_frame(self):
        """One row per rewritten tensor (pandas DataFrame; a new tensor's norm before is NaN)."""
        import pandas as pd

        rows = [{"name": c.name, "channels_changed": c.channels_changed,
                 "norm_before": _float(c.norm_before), "norm_after": c.norm_after} for c in self.changes]
        return pd.DataFrame(rows, columns=["name", "channels_changed", "norm_before", "norm_after"])


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def reinit(checkpoint: str | Path | Subject, out: str | Path, options: ReinitOptions | None = None, *,
           data: DataSource | None = None, thresholds: Thresholds | None = None, load: LoadOptions | None = None,
           in_place: bool = False, drop_optimizer: bool = False, fmt: str | None = None) -> ReinitResult:
    """Rewrite ``checkpoint`` into ``out`` with ``options`` (default: ABRi fold on the flagged channels) and
    verify the written file.

    ``data``: the data for the data-driven steps (recalibration, ``--stats data``, the re-learning
    diagnosis) and for the forward check; its ``amp`` runs those passes under autocast on CUDA.
    ``thresholds``: what the before and after scans count as dead. ``load``: how to open a path (ignored
    for a Subject). ``in_place``: ``out`` may be the input, replaced atomically. ``drop_optimizer``: leave
    the optimizer state out. ``fmt``: the output format (default: the input's, or ``.safetensors`` by name).

    Nothing in scope (a healthy checkpoint with the default scope) is a success: nothing is written, the
    result's ``target`` is None and its warning says how to widen the scope. Raises UsageError for bad
    options, VerificationError when the written file does
    not hold the intended rewrite (nothing is then written), other AvdiagError subclasses for bad input.
    """
    if data is not None and data.float64:
        raise UsageError("--float64 is for the measuring commands (inspect, conflict, check): a rewrite keeps the "
                         "checkpoint's own dtypes")
    options = options or ReinitOptions()
    method, settings = options.resolved(has_data=data is not None)
    modality = options.modality
    subject = Subject.of(checkpoint, load)
    thresholds = thresholds or Thresholds()
    before = scan(subject, thresholds, model=data.model if data is not None else None)
    batches = _Batches(data) if data is not None else None
    target_input = methods.RewriteInput(subject.ckpt, subject.located, before.layers, modality,
                                        _data_access(subject, data, batches) if data is not None else None,
                                        thresholds)
    rewrite = method.apply(target_input, settings)
    if not rewrite.tensors:
        return replace(_nothing_to_do(subject, method.name, rewrite, before), data=_data_report(data))
    target = Path(out)
    verification, warnings = _write_verified(subject, rewrite, method, settings, before, target, data, batches,
                                             in_place=in_place, drop_optimizer=drop_optimizer, fmt=fmt)
    after = _scan_written(subject, target, method, settings, thresholds)
    return ReinitResult(subject.ref(), str(target), method.name, rewrite.parameters,
                        _changes(subject.ckpt, rewrite.tensors), _dead(before), _dead(after),
                        verification, warnings, rewrite.diagnosis, rewrite.revived, _still_dead(rewrite.scope, after),
                        _data_report(data))


def _data_report(data: DataSource | None) -> dict[str, Any] | None:
    return data.report() if data is not None else None


def _nothing_to_do(subject: Subject, method: str, rewrite, before) -> ReinitResult:
    """A checkpoint with nothing in scope is a success: nothing is written, and the note says how to widen the scope."""
    words = _scope_words(method, rewrite.parameters)
    wider = " (--scope layers or --scope all rewrites more)" if "flagged" in words else ""
    note = f"nothing in scope to rewrite ({words}): no file was written{wider}"
    return ReinitResult(subject.ref(), None, method, rewrite.parameters, [], _dead(before), _dead(before),
                        {"reloaded": False, "identical": 0, "rewritten": 0, "forward": None}, [note],
                        rewrite.diagnosis)


def _scope_words(method: str, parameters: dict[str, Any]) -> str:
    """The settings that chose what to rewrite, e.g. "scope 'flagged', modality audio"."""
    words = [f"{key} {parameters[key]!r}" for key in ("scope", "variant") if parameters.get(key)]
    if parameters.get("modality"):
        words.append(f"modality {parameters['modality']}")
    words += [f"{m} {state}" for m, state in (parameters.get("per_modality") or {}).items()]
    return ", ".join(words) or f"method {method}"


class _Batches:
    """The data's batches per split, read as the steps ask for them; the first batch of each pass is kept,
    so the forward check reuses it instead of decoding the split again."""

    def __init__(self, data: DataSource):
        self.data = data
        self.first: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, split: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        split = split or self.data.split
        for i, batch in enumerate(self.data.loader(split)):
            if i == 0:
                self.first.setdefault(split, batch)
            yield batch

    def first_batch(self) -> dict[str, torch.Tensor]:
        split = self.data.split
        if split not in self.first:
            self.first[split] = next(iter(self.data.loader(split)))
        return self.first[split]


def _data_access(subject: Subject, data: DataSource, batches: _Batches) -> methods.DataAccess:
    def classes(split: str | None) -> int:
        return len(getattr(data.dataset(split), "classes", None) or [])

    return methods.DataAccess(model=lambda: subject.model_for(data), batches=batches, classes=classes,
                              device=data.torch_device(), amp=data.amp)


def _scan_written(subject: Subject, target: Path, method: methods.Method, settings: Any,
                  thresholds: Thresholds) -> InspectResult:
    """The dead-channel scan after the rewrite: of the written file, or, for a method that writes a
    re-parametrisation (ABRi's module mode), of the plain layers it acts as, saved to a temporary file."""
    written = _reopened(subject, target)
    effective = method.effective_tensors(written.ckpt, settings) if method.effective_tensors else None
    if effective is None:
        return scan(written, thresholds, hash_file=False)
    with tempfile.TemporaryDirectory(prefix="avdiag-effective-") as folder:
        path = Path(folder) / "effective.pt"
        torch.save(effective, path)
        return scan(_reopened(subject, path), thresholds, hash_file=False)


def _reopened(subject: Subject, target: Path) -> Subject:
    """The written file, opened as the input was, knowing what each BN feeds as the input's scan did."""
    written = Subject.open(target, _reopen_options(subject))
    known = {layer.name: layer for layer in subject.located.layers}
    for layer in written.located.layers:
        same = known.get(layer.name)
        if same is not None and same.activation_source.startswith("model:"):
            layer.feeds_activation, layer.activation = same.feeds_activation, same.activation
            layer.activation_source, layer.eps, layer.eps_source = same.activation_source, same.eps, same.eps_source
    written.located.consumers_from = subject.located.consumers_from
    return written


def _still_dead(scope: dict[str, list[int] | None] | None, after: InspectResult) -> dict[str, list[int]] | None:
    """Layer -> the channels of the rewrite's scope that the scan of the written file finds dead (None when
    the method makes no such promise)."""
    if scope is None:
        return None
    out = {}
    for v in after.layers:
        if v.layer.name in scope:
            wanted = scope[v.layer.name]
            dead = [c for c in v.dead if wanted is None or c in set(wanted)]
            if dead:
                out[v.layer.name] = dead
    return out


def _reopen_options(subject: Subject) -> LoadOptions:
    """How to open the written file: the input's globals, BN eps and assumed activation; its modality
    prefixes when the user gave them (detection finds the same ones otherwise)."""
    layout = subject.located.layout
    return LoadOptions(allow_globals=tuple(subject.options.allow_globals),
                       modality=dict(layout.modalities) if layout.source == "user" else None,
                       bn_eps=subject.options.bn_eps, assume_activation=subject.options.assume_activation)


def _write_verified(subject: Subject, rewrite: methods.Rewrite, method: methods.Method, settings: Any,
                    before: InspectResult, target: Path, data: DataSource | None, batches: _Batches | None, *,
                    in_place: bool, drop_optimizer: bool, fmt: str | None) -> tuple[dict[str, Any], list[str]]:
    """Write the rewrite atomically, verifying the temporary file first: (the verification, the warnings)."""
    from avdiag.load.write import Provenance, write_checkpoint

    provenance = Provenance(method.name, rewrite.parameters, before.checkpoint.sha256, __version__)
    record: dict[str, Any] = {}

    def verify(written: Path) -> None:
        # Runs on the temporary file before it replaces the target: a failed check leaves the target
        # (and, in place, the input) untouched.
        try:
            record.update(_verify(subject, rewrite.tensors, written, method, settings, data, batches))
        except VerificationError:
            raise
        except Exception as e:
            raise VerificationError(f"{target}: verifying the written file failed ({type(e).__name__}: {e}); "
                                    "nothing was written") from e

    warnings = write_checkpoint(subject.ckpt, rewrite.tensors, target, provenance=provenance,
                                drop_optimizer=drop_optimizer, in_place=in_place, fmt=fmt, verify=verify)
    return record, warnings


def _verify(subject: Subject, new: dict[str, torch.Tensor], path: Path, method: methods.Method, settings: Any,
            data: DataSource | None, batches: _Batches | None) -> dict[str, Any]:
    """Reload the written file: every tensor outside the rewrite is bit-identical, the rewritten ones hold
    the intended values; with a resolvable model, one forward pass gives finite outputs."""
    from avdiag.load import load_checkpoint

    written = load_checkpoint(path, allow_globals=tuple(subject.options.allow_globals))
    ckpt = subject.ckpt
    problems = [n for n in ckpt.tensors.names() if n not in new and not _stored(written, n, ckpt.tensors.get(n))]
    problems += [n for n, t in new.items() if not _stored(written, n, t)]
    if problems:
        raise VerificationError(f"the written file differs from the intended rewrite at {len(problems)} "
                                f"tensor(s), e.g. {problems[0]}; nothing was written")
    identical = sum(1 for n in ckpt.tensors.names() if n not in new)
    forward, change = _forward_check(subject, Subject(written, subject.located, subject.options), method, settings,
                                     data, batches)
    return {"reloaded": True, "identical": identical, "rewritten": len(new), "forward": forward,
            "output_change": change}


def _stored(written: Checkpoint, name: str, intended: torch.Tensor) -> bool:
    return name in written.tensors and _same_bits(intended, written.tensors.get(name))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _forward_check(original: Subject, written: Subject, method: methods.Method, settings: Any,
                   data: DataSource | None, batches: _Batches | None) -> tuple[str, dict[str, Any] | None]:
    """("finite", how far the outputs moved) after one forward pass of the written model next to the
    original one on the same batch; ("skipped (...)", None) when no model can run."""
    factory = data.model if data is not None else None
    try:
        resolved = method.written_model(written.ckpt, written.located, settings, factory) \
            if method.written_model else None
        if resolved is None:
            resolved = written.model(factory, data.visual_layout if data is not None else None)
    except ModelError:
        return "skipped (no model: pass --model to check a forward pass)", None
    device = data.torch_device() if data is not None else torch.device("cpu")
    batch = batches.first_batch() if batches is not None else _synthetic_batch()
    try:
        outputs = _run(resolved, batch, device, data.amp if data is not None else False)
    except ModelError as e:
        if data is not None:
            raise
        return f"skipped (the model does not take avdiag's synthetic batch: {e}; pass --data to check)", None
    tensors = list(tensors_in(outputs))
    if not tensors or not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise VerificationError("a forward pass of the rewritten model gives non-finite outputs; nothing was written")
    return "finite", _output_change(original, data, batch, device, tensors)


def _output_change(original: Subject, data: DataSource | None, batch: dict[str, torch.Tensor], device: torch.device,
                   after: list[torch.Tensor]) -> dict[str, Any] | None:
    """The largest |change| of the model's outputs (the logits) between the input and the rewritten file on
    the batch the forward check used; None when the original model cannot run."""
    try:
        factory = data.model if data is not None else None
        resolved = original.model(factory, data.visual_layout if data is not None else None)
        before = list(tensors_in(_run(resolved, batch, device, data.amp if data is not None else False)))
    except ModelError:
        return None
    pairs = [(a, b) for a, b in zip(before, after) if a.shape == b.shape]
    if not pairs or len(before) != len(after):
        return None
    max_abs = max(float((b.double() - a.double()).abs().max()) for a, b in pairs)
    scale = max(float(a.double().abs().max()) for a, _ in pairs)
    return {"max_abs": max_abs, "max_abs_before": scale, "samples": int(len(batch["label"])),
            "batch": "data" if data is not None else "synthetic"}


def _run(resolved, batch: dict[str, torch.Tensor], device: torch.device, amp: bool) -> Any:
    module = resolved.to(device)
    if not isinstance(module, torch.fx.GraphModule):
        module.eval()
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode(), autocast(device, amp):
        return resolved(inputs)


def _synthetic_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"audio": torch.randn(2, 128, 96, generator=g), "visual": torch.randn(2, 3, 1, 64, 64, generator=g),
            "label": torch.zeros(2, dtype=torch.long)}


def _changes(ckpt: Checkpoint, new: dict[str, torch.Tensor]) -> list[RewrittenTensor]:
    return [_change(ckpt.tensors.get(name) if name in ckpt.tensors else None, name, tensor)
            for name, tensor in new.items()]


def _change(before: torch.Tensor | None, name: str, after: torch.Tensor) -> RewrittenTensor:
    norm_after = float(after.double().norm())
    if before is None or before.shape != after.shape:
        return RewrittenTensor(name, after.shape[0] if after.dim() else 1, None, norm_after)
    if before.dim():
        rows = (before.reshape(before.shape[0], -1) != after.reshape(after.shape[0], -1)).any(dim=1)
    else:
        rows = (before != after).reshape(1)
    return RewrittenTensor(name, int(rows.sum()), float(before.double().norm()), norm_after)


def _dead(result: InspectResult) -> dict[str, int]:
    return {name: m.n_dead for name, m in result.modalities.items()}

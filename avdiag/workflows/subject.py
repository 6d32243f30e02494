"""The checkpoint being diagnosed: opened once, its layers located once, its model resolved once (lazily).

Every workflow takes a :class:`Subject` (or a path, opened with the default options). A command that
needs the same checkpoint twice (the static scan and the data analysis of ``check --data``, both
sides of ``diff``) asks the same Subject and never re-reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avdiag.errors import ModelError
from avdiag.results import CheckpointRef


@dataclass
class LoadOptions:
    """How to open and locate a checkpoint.

    ``allow_globals``: pickle globals admitted as inert placeholders. ``unsafe``: full pickle (runs
    code in the file). ``modality``: modality name -> layer-name prefix (``{"audio": "audio_net"}`` or
    ``["audio=audio_net"]``), overriding detection. ``bn_eps``: BatchNorm eps where the graph does not
    tell. ``assume_activation``: what an unknown BN feeds (e.g. ``"relu"``).
    """

    allow_globals: tuple[str, ...] = ()
    unsafe: bool = False
    modality: dict[str, str] | list[str] | None = None
    bn_eps: float | None = None
    assume_activation: str | None = None


@dataclass
class Subject:
    """A loaded and located checkpoint, with its model built on first use."""

    ckpt: Any  # avdiag.load.Checkpoint
    located: Any  # avdiag.locate.Located
    options: LoadOptions = field(default_factory=LoadOptions)
    _sha256: str | None = field(default=None, init=False, repr=False)
    _models: dict[tuple, Any] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def open(cls, path: str | Path, options: LoadOptions | None = None) -> "Subject":
        """Load ``path`` safely and locate its layers (raises AvdiagError subclasses on bad input)."""
        from avdiag.load import load_checkpoint
        from avdiag.locate import locate, parse_overrides

        options = options or LoadOptions()
        ckpt = load_checkpoint(path, allow_globals=tuple(options.allow_globals), unsafe=options.unsafe)
        modality = options.modality
        if isinstance(modality, dict):
            modality = [f"{k}={v}" for k, v in modality.items()]
        overrides = parse_overrides(modality) if modality else None
        located = locate(ckpt, modality_overrides=overrides, bn_eps=options.bn_eps,
                         assume_activation=options.assume_activation)
        return cls(ckpt, located, options)

    @classmethod
    def of(cls, checkpoint: "str | Path | Subject", options: LoadOptions | None = None) -> "Subject":
        """``checkpoint`` itself when it is a Subject, else the Subject of that path."""
        if isinstance(checkpoint, Subject):
            return checkpoint
        return cls.open(checkpoint, options)

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @property
    def layout(self):
        return self.located.layout

    def sha256(self) -> str:
        """SHA-256 of the file(s), computed once."""
        if self._sha256 is None:
            from avdiag.load import sha256_of

            self._sha256 = sha256_of(self.ckpt.files)
        return self._sha256

    def remember_sha256(self, digest: str | None) -> None:
        if digest is not None:
            self._sha256 = digest

    def ref(self) -> CheckpointRef:
        return CheckpointRef(str(self.ckpt.path), self.ckpt.format, self._sha256)

    def model(self, factory: str | None = None, visual_layout: str | None = None, dtype=None):
        """The network behind the checkpoint (:class:`avdiag.locate.resolve.ResolvedModel`), built once per
        ``factory`` (None = the built-in registry or the file's own graph) and ``dtype`` (None: as loaded)."""
        key = (factory, visual_layout, dtype)
        if key not in self._models:
            from avdiag.locate.resolve import resolve_model

            resolved = resolve_model(self.ckpt, self.located.layout, factory)
            if visual_layout:
                resolved.visual_layout = visual_layout
            if dtype is not None:
                resolved.cast(dtype)
            self._models[key] = resolved
        return self._models[key]

    def model_for(self, data) -> Any:
        """The model to run on ``data`` (a DataSource): its ``--model`` and ``--visual-layout``. Refuses data
        with more classes than the model's head has (a one-line ModelError instead of an index error later)."""
        resolved = self.model(data.model, data.visual_layout, data.dtype if data.float64 else None)
        _check_classes(resolved, data)
        return resolved


def _check_classes(resolved, data) -> None:
    head = getattr(getattr(resolved, "spec", None), "n_classes", None)
    classes = getattr(data.dataset(), "classes", None) or []
    if head and len(classes) > head:
        raise ModelError(f"the data has {len(classes)} classes, the model's head has {head}: use data with the "
                         "checkpoint's classes (or the checkpoint trained on this data)")

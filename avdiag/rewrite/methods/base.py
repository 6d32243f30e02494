"""What every rewrite method shares: the registry, what ``apply`` is given and what it returns.

A method is one module in this package that calls :func:`register` with a :class:`Method`: its name
(the ``--method`` word), its options (a dataclass whose defaults are the documented ones), their
validation and ``apply``. Modules in this package are imported when the package is, so adding a method
is adding a file; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from avdiag.errors import UsageError
from avdiag.load import Checkpoint
from avdiag.locate import BNLayer, Located
from avdiag.locate.resolve import ResolvedModel
from avdiag.measure.static import LayerVerdicts
from avdiag.measure.thresholds import Thresholds


@dataclass
class DataAccess:
    """The data a data-driven method runs the checkpoint's model on; the workflow supplies it.

    ``model()``: the checkpoint's network (built once, shared: change it only through
    :func:`tensors_swapped_in`). ``batches(split)``: the batches of ``split`` (None: the data's own split).
    ``classes(split)``: how many classes the dataset declares (0 when it does not say). ``amp``: run
    forward passes under autocast (CUDA only).
    """

    model: Callable[[], ResolvedModel]
    batches: Callable[[str | None], Iterable[dict[str, torch.Tensor]]]
    classes: Callable[[str | None], int]
    device: torch.device
    amp: bool = False


@dataclass
class RewriteInput:
    """What a method rewrites: the checkpoint, its located layers, the static scan before the rewrite,
    the modality the user restricted the rewrite to (None: every modality), the data, if any, and the
    thresholds the scans before and after the rewrite count dead channels with."""

    ckpt: Checkpoint
    located: Located
    layers: list[LayerVerdicts]
    modality: str | None = None
    data: DataAccess | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def in_scope(self, modality: str) -> bool:
        return self.modality is None or modality == self.modality

    def scoped_layers(self) -> list[LayerVerdicts]:
        """The scanned BN layers of the chosen modality (all of them without a restriction)."""
        return [v for v in self.layers if self.in_scope(v.layer.modality)]

    def tensor(self, name: str) -> torch.Tensor:
        return self.ckpt.tensors.get(name)

    def affine(self, layer: BNLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) of ``layer``; a BN without them acts as gamma 1, beta 0."""
        gamma = self.tensor(layer.params["weight"]) if "weight" in layer.params else torch.ones(layer.channels)
        beta = self.tensor(layer.params["bias"]) if "bias" in layer.params else torch.zeros(layer.channels)
        return gamma, beta


@dataclass
class Rewrite:
    """What ``apply`` returns: the new tensors (clean name -> tensor, changed or added), the parameters
    recorded in the written file's provenance, and the diagnosis the method made, if any.

    ``scope``: BN layer -> the channels the rewrite means to leave alive (None: the whole layer), for a
    method that promises it; the workflow reports those the scan of the written file still finds dead
    (``still_dead``). ``revived``: BN layer -> {"channels": [...], "alpha": [...]}, the channels that
    needed more than the method's own formula to come back (ABRi's reviving alpha).
    """

    tensors: dict[str, torch.Tensor]
    parameters: dict[str, Any]
    diagnosis: dict[str, Any] = field(default_factory=dict)
    scope: dict[str, list[int] | None] | None = None
    revived: dict[str, dict[str, list]] = field(default_factory=dict)


def _no_extra_check(options: Any, has_data: bool) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One registered rewrite method.

    ``options``: the dataclass of its settings (constructible without arguments: the defaults).
    ``validate(options, has_data)``: raises a one-line :class:`UsageError` for a bad setting.
    ``apply(input, options)``: returns the :class:`Rewrite`. ``written_model(written, located, options,
    factory)``: for a method whose output the built-in resolution cannot load (extra keys), the model to
    run the forward check on; None where the ordinary resolution applies. ``effective_tensors(written,
    options)``: for such a method, the plain state dict its written layers act as (what the dead-channel
    scan after the rewrite reads); None where the written file is plain already.
    """

    name: str
    options: type
    apply: Callable[[RewriteInput, Any], Rewrite]
    validate: Callable[[Any, bool], None] = _no_extra_check
    written_model: Callable[[Checkpoint, Located, Any, str | None], ResolvedModel | None] | None = None
    effective_tensors: Callable[[Checkpoint, Any], dict[str, torch.Tensor] | None] | None = None
    description: str = ""

    def settings(self, options: Any | None) -> Any:
        """``options`` checked to be this method's (None: the defaults)."""
        if options is None:
            return self.options()
        if not isinstance(options, self.options):
            raise UsageError(f"--method {self.name} takes {self.options.__name__}, not {type(options).__name__}")
        return options

    def settings_from(self, flags: dict[str, Any]) -> Any:
        """The options built from the flags this method knows; flags of other methods are left out."""
        known = set(self.options.__dataclass_fields__)
        return self.options(**{k: v for k, v in flags.items() if k in known})


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` selectable by its name; a name is registered once."""
    if method.name in _METHODS:
        raise ValueError(f"a rewrite method named {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Forget the method called ``name`` (nothing happens when there is none)."""
    _METHODS.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_METHODS))


def get(name: str) -> Method:
    """The method called ``name``; a UsageError naming the registered ones otherwise."""
    if name not in _METHODS:
        raise UsageError(f"--method must be one of {', '.join(names())}")
    return _METHODS[name]


def one_of(value: Any, allowed: tuple[str, ...], flag: str) -> None:
    """A UsageError unless ``value`` is one of ``allowed``, in the words the command line has used."""
    if value not in allowed:
        words = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
        raise UsageError(f"{flag} must be {words}")


@contextmanager
def tensors_swapped_in(resolved: ResolvedModel, tensors: dict[str, torch.Tensor]) -> Iterator[ResolvedModel]:
    """``resolved`` with ``tensors`` (checkpoint names) loaded for the duration of the block, its own
    values put back afterwards: the model is shared with the rest of the command."""
    prefix = resolved.name_prefix
    inner = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    state = resolved.module.state_dict()
    saved = {name: state[name].detach().clone() for name in inner if name in state}
    resolved.module.load_state_dict(inner, strict=False)
    try:
        yield resolved
    finally:
        resolved.module.load_state_dict(saved, strict=False)


def needs_data(target: RewriteInput, what: str) -> DataAccess:
    """The input's data, or a UsageError saying that ``what`` needs --data."""
    if target.data is None:
        raise UsageError(f"{what} needs --data")
    return target.data


def recalibrated_stats(target: RewriteInput, layer_names: set[str], tensors: dict[str, torch.Tensor],
                       what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running (mean, var) of ``layer_names`` re-estimated on the data's batches, with ``tensors``
    (the rewrite so far) in the model."""
    from avdiag.rewrite.recalibrate import recalibrate

    data = needs_data(target, what)
    with tensors_swapped_in(data.model(), tensors) as resolved:
        return recalibrate(resolved, layer_names, data.batches(None), data.device, data.amp)

"""Model resolution: build the network behind a checkpoint so it can be run on data.

Sources, in order: ``--model package.module:factory`` (the user's own class, strict load), the
graph the file carries (torch.export programs), the architecture registry (``avdiag/models/arch/``:
research layouts and plain ResNets, hyper-parameters read from tensor shapes), TorchScript modules
whose tensors fit a registered architecture.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import inspect as pyinspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from avdiag.errors import AvdiagError, ModelError
from avdiag.load import Checkpoint
from avdiag.locate.modality import MODALITY_WORDS, Layout
from avdiag.models.registry import ArchSpec, build, encoder_at, spec_from_checkpoint


@dataclass
class ResolvedModel:
    module: nn.Module
    source: str  # registry:<name> / factory:<spec> / graph:torch-export
    inputs: tuple[str, ...]  # forward() arguments by modality; ("image",) = the batch's only modality
    visual_layout: str = "BCTHW"
    spec: ArchSpec | None = None
    name_prefix: str = ""  # prepended to module names to get checkpoint layer names
    static_batch: int | None = None  # exported programs traced with a fixed batch size
    program: Any = None  # the torch.export ExportedProgram behind ``module`` (graph:torch-export)
    dtype: torch.dtype | None = None  # set by cast(): the model runs in this dtype (float64 measurements)

    def __call__(self, batch: dict[str, torch.Tensor]) -> Any:
        names = self.inputs
        if len(names) == 1 and names[0] not in batch:
            names = ("image",)  # a one-input model on data without that modality: feed the one it has
        args = [adapt_input(batch, name, self.visual_layout) for name in names]
        try:
            return self._forward(args)
        except AvdiagError:
            raise
        except Exception as e:  # the user's model rejecting the data is an input problem, said in one line
            if is_out_of_memory(e):
                raise out_of_memory_error(e, _batch_size(batch, args)) from e
            shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, args))
            raise ModelError(f"the model ({self.source}) failed on a batch of {shapes}: {type(e).__name__}: "
                             f"{str(e).strip() or 'no message'} ({self._failure_hint(e)})") from e

    def _failure_hint(self, e: Exception) -> str:
        if self.dtype == torch.float64 and any(w in str(e) for w in ("Double", "Float", "dtype", "scalar type")):
            return "with --float64: the model makes float32 tensors of its own; run it without --float64"
        return "check --model / --visual-layout"

    def fed(self, modalities: tuple[str, ...] | list[str]) -> str:
        """What this model is given of data holding ``modalities``: "audio + visual", or for a one-input
        model the modality it takes and what stays unused ("visual (frames folded into the batch); audio
        unused")."""
        names = self.inputs
        if len(names) == 1 and names[0] not in modalities:
            names = ("image",)
        used = [("visual" if "visual" in modalities else "audio") if n == "image" else n for n in names]
        text = " + ".join(used)
        if names == ("image",) and used == ["visual"]:
            text += " (frames folded into the batch)"
        unused = [m for m in modalities if m not in used]
        return text + (f"; {', '.join(unused)} unused" if unused else "")

    def to(self, device: torch.device | str) -> nn.Module:
        """Put the model on ``device`` and return its module. An exported program goes through
        torch.export's device pass, which also rewrites the device arguments its graph carries
        (``torch.ones(..., device="cpu")`` traced into the program), then is unlifted again."""
        device = _canonical(torch.device(device))
        with out_of_memory_as_error():
            if self.program is not None:
                if _program_device(self.program) != device:
                    self.program = _move_program(self.program, device)
                    self.module = self.program.module()
                return self.module
            self.module = move_module(self.module, device)
        return self.module

    def cast(self, dtype: torch.dtype) -> None:
        """Run in ``dtype`` (float64 measurements): parameters and floating buffers converted. An exported
        program's graph fixes the dtypes of what it creates, so it is refused in one line."""
        if self.program is not None:
            raise ModelError(f"--float64 needs a model built from Python (the built-in registry or --model): the "
                             f"exported program's graph ({self.source}) fixes its dtypes")
        self.module = self.module.to(dtype)
        self.dtype = dtype

    def _forward(self, args: list[torch.Tensor]) -> Any:
        if self.static_batch is None or args[0].shape[0] == self.static_batch:
            return self.module(*args)
        n, step = args[0].shape[0], self.static_batch
        if n % step:
            raise ModelError(f"the exported program takes batches of exactly {step}; use a --batch-size and "
                             f"--limit divisible by {step}, or export with a dynamic batch dimension")
        return [self.module(*[a[i:i + step] for a in args]) for i in range(0, n, step)]


# ---- running out of memory ---------------------------------------------------------------------

_OOM_MARKERS = ("out of memory", "can't allocate memory", "alloc_failed")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocator running out of memory (CUDA, cuBLAS/cuDNN workspaces, the CPU)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _OOM_MARKERS)


def out_of_memory_error(e: BaseException, batch_size: int | None = None) -> ModelError:
    """The one-line error for ``e``: which memory ran out and what to reduce."""
    gpu = isinstance(e, torch.OutOfMemoryError) or "cuda" in str(e).lower()
    size = f" (now {batch_size})" if batch_size else ""
    where = f" on a batch of {batch_size} samples" if batch_size else ""
    advice = f"reduce --batch-size{size} or --limit" + (", or run on --device cpu" if gpu else "")
    return ModelError(f"out of {'GPU' if gpu else 'host'} memory{where}: {advice}")


@contextmanager
def out_of_memory_as_error(batch_size: int | None = None) -> Iterator[None]:
    """Turn running out of memory inside the block into :func:`out_of_memory_error`'s ModelError."""
    try:
        yield
    except AvdiagError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory_error(e, batch_size) from e
        raise


def move_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)``, skipped when every parameter and buffer is there already: ``.to`` walks
    every submodule, milliseconds of host time per call for a ResNet pair, which a launch-bound GPU
    pass of a few milliseconds notices."""
    device = _canonical(torch.device(device))
    tensors = itertools.chain(module.parameters(), module.buffers())
    if all(t.device == device for t in tensors):
        return module
    return module.to(device)


def _canonical(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``, the way tensors report their device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _program_device(program: Any) -> torch.device | None:
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)


def _move_program(program: Any, device: torch.device) -> Any:
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device)


def _batch_size(batch: dict[str, torch.Tensor], args: list[torch.Tensor]) -> int | None:
    label = batch.get("label")
    if isinstance(label, torch.Tensor) and label.dim() == 1:
        return int(label.shape[0])
    return int(args[0].shape[0]) if args and args[0].dim() else None


def adapt_input(batch: dict[str, torch.Tensor], name: str, visual_layout: str) -> torch.Tensor:
    """Map a modality-keyed batch onto one forward() argument."""
    if name == "image":  # a single-input 2-D CNN: the batch's only modality, frames folded into the batch
        present = [m for m in ("visual", "audio") if m in batch]
        if not present:
            raise ModelError("the data has neither audio nor visual inputs")
        x = batch[present[0]]
        if present[0] == "audio":
            return x.unsqueeze(1) if x.dim() == 3 else x
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if name not in batch:
        provided = sorted(k for k in batch if k not in ("label", "index"))
        raise ModelError(f"the model takes {name!r} input but the data provides {provided}")
    x = batch[name]
    if name == "visual" and visual_layout == "BTCHW":
        x = x.permute(0, 2, 1, 3, 4)
    return x


def resolve_model(ckpt: Checkpoint, layout: Layout, model: str | None = None) -> ResolvedModel:
    state = {n: ckpt.tensors.get(n) for n in ckpt.tensors.names()}
    if model:
        return _from_factory(model, state)
    if ckpt.format == "torch-export":
        return _from_export(ckpt)
    outer = outer_prefix(layout)
    inner = {n[len(outer):]: t for n, t in state.items() if n.startswith(outer)}
    spec = spec_from_checkpoint(ckpt.tensors.renamed(lambda n: n[len(outer):] if n.startswith(outer) else n),
                                layout.name, layout.fusion)
    if spec is None:
        raise ModelError(f"{ckpt.path}: layout {layout.name!r} matches no built-in architecture; "
                         "pass --model package.module:factory")
    module = build(spec)
    _strict_load(module, inner if outer else state, f"built-in {spec.name}")
    return ResolvedModel(module.eval(), f"registry:{spec.name}", spec.inputs, spec.visual_layout, spec, outer)


def outer_prefix(layout: Layout) -> str:
    """An outer prefix such as Lightning's `model.` in front of the encoders: what precedes the
    encoder's own name (one segment, or as many as a registered family's encoder pattern spans)."""
    for prefix in layout.modalities.values():
        parts = prefix.rstrip(".").split(".")
        cut = len(parts) - _encoder_span(parts)
        return ".".join(parts[:cut]) + "." if cut > 0 else ""
    return ""


def _encoder_span(parts: list[str]) -> int:
    hit = next((h for i in range(len(parts)) if (h := encoder_at(parts, i)) is not None), None)
    return hit[1] if hit is not None else 1


def _from_factory(spec: str, state: dict[str, torch.Tensor]) -> ResolvedModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"--model wants package.module:factory, got {spec!r}")
    try:
        with _current_folder_importable():
            factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"--model {spec}: cannot import ({e}); the module must be importable from the current "
                         "folder or PYTHONPATH") from e
    try:
        module = factory()
    except Exception as e:
        raise ModelError(f"--model {spec}: the factory failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelError(f"--model {spec}: the factory returned {type(module).__name__}, not a torch nn.Module")
    _strict_load(module, state, spec)
    visual_layout = getattr(module, "visual_layout", "BCTHW")
    return ResolvedModel(module.eval(), f"factory:{spec}", _forward_inputs(module.forward), visual_layout)


@contextmanager
def _current_folder_importable() -> Iterator[None]:
    """``--model mymodels:make`` finds ``./mymodels.py``, as ``python -m`` would (the console script
    does not put the current folder on sys.path)."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def _forward_inputs(forward: Any) -> tuple[str, ...]:
    params = [p for p in pyinspect.signature(forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) == 1:
        # A single argument named for audio gets the spectrogram as the data holds it; any other name
        # means a 2-D CNN fed the batch's visual frames (folded into the batch) or its only modality.
        return ("audio",) if _modality_of(params[0].name) == "audio" else ("image",)
    names = []
    for p in params:
        match = _modality_of(p.name)
        if match is None:
            raise ModelError(f"cannot tell which modality forward() argument {p.name!r} takes; "
                             "name it audio/visual (or spec/image/video ...)")
        names.append(match)
    return tuple(names)


def _modality_of(name: str) -> str | None:
    tokens = set(name.lower().split("_"))
    return next((m for m, words in MODALITY_WORDS.items() if tokens & words), None)


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` only when every key and shape fits; else one line naming the
    missing, unexpected and mis-shaped keys (load_state_dict would raise mid-way on a shape)."""
    expected = module.state_dict()
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(expected[n].shape)}" for n, t in state.items()
             if n in expected and expected[n].shape != t.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ModelError(f"the checkpoint does not fit {what}: " + "; ".join(parts))
    module.load_state_dict(state)


def _from_export(ckpt: Checkpoint) -> ResolvedModel:
    # The archive passed avdiag's pickle gate while loading, so torch.export.load only meets
    # pickles that name allow-listed globals.
    try:
        program = torch.export.load(str(ckpt.path))
    except Exception as e:
        raise ModelError(f"{ckpt.path}: cannot rebuild the exported program ({type(e).__name__}: {e})") from e
    module = program.module()
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in
                   set(program.graph_signature.user_inputs)]
    inputs = ("image",) if len(user_inputs) == 1 else ("audio", "visual")[:len(user_inputs)]
    batch = user_inputs[0].meta.get("val").shape[0] if user_inputs and "val" in user_inputs[0].meta else None
    static = batch if isinstance(batch, int) else None
    return ResolvedModel(module, "graph:torch-export", inputs, static_batch=static, program=program)

"""Load: read any supported checkpoint safely and lazily (see :func:`load_checkpoint`)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avdiag.errors import NothingToAnalyseError, UnreadableCheckpointError
from avdiag.load import detect, readers
from avdiag.load.store import TensorInfo, TensorStore
from avdiag.load.unwrap import Unwrapped, strip_wrapper_prefixes

__all__ = ["Checkpoint", "TensorInfo", "TensorStore", "Unwrapped", "load_checkpoint", "sha256_of"]


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors under their clean names, plus where they came from."""

    path: Path
    format: str
    tensors: TensorStore
    unwrapped: list[Unwrapped] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    graph: Any = None  # the torch.export program (JSON) or the TorchScript module, when the file has one
    metadata: dict[str, str] = field(default_factory=dict)
    original_names: dict[str, str] = field(default_factory=dict)  # clean name -> name in the file
    root: Any = None  # torch pickles: the whole saved object (optimizer state etc.), for writing back

    @property
    def state_path(self) -> list[str]:
        """Keys leading from ``root`` to the state dict (e.g. ["model"])."""
        return [u.value for u in self.unwrapped if u.kind in ("key", "lightning")]


def load_checkpoint(path: str | Path, *, allow_globals: list[str] | tuple[str, ...] = (),
                    unsafe: bool = False) -> Checkpoint:
    """Open ``path`` (file or sharded folder) without executing code from it.

    The format is detected from the content. Torch pickles are read with torch's weights-only
    unpickler (``allow_globals`` names extra globals, rebuilt as inert placeholders); ``unsafe=True``
    uses full pickle and runs whatever code the file carries. Tensors stay on disk (mmap or
    safetensors slices) until asked for.
    """
    path = Path(path)
    fmt = detect.detect_format(path)
    allow = list(allow_globals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation chatter about old pickles is not for users
        raw = _read(path, fmt, allow, unsafe)
    if len(raw.tensors) == 0:
        raise NothingToAnalyseError(f"{path}: holds no tensors (nothing to analyse)")
    rename, steps = strip_wrapper_prefixes(raw.tensors.names())
    return Checkpoint(
        path=path,
        format=fmt,
        tensors=raw.tensors.renamed(rename.__getitem__),
        unwrapped=raw.unwrapped + steps,
        extras=raw.extras,
        files=raw.files,
        graph=raw.graph,
        metadata=raw.metadata,
        original_names={v: k for k, v in rename.items()},
        root=raw.root,
    )


def _read(path: Path, fmt: str, allow: list[str], unsafe: bool) -> readers.RawCheckpoint:
    if fmt in (detect.TORCH_ZIP, detect.TORCH_LEGACY):
        return readers.read_torch_pickle(path, fmt, allow, unsafe)
    if fmt == detect.SAFETENSORS:
        return readers.read_safetensors(path)
    if fmt == detect.SHARDED:
        return readers.read_sharded(path, allow, unsafe)
    if fmt == detect.TORCHSCRIPT:
        return readers.read_torchscript(path, unsafe)
    if fmt == detect.TORCH_EXPORT:
        return readers.read_torch_export(path, allow, unsafe)
    raise UnreadableCheckpointError(f"{path}: unsupported format {fmt}")


def sha256_of(files: list[Path], chunk: int = 1 << 22) -> str:
    """SHA-256 of one file, or of the concatenated digests of several (sharded checkpoints)."""
    digests = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()

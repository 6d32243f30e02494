"""Loading torch pickles without running their code.

Every torch pickle goes through torch's weights-only unpickler. Before that, the globals the pickle
names are listed statically (``torch.serialization.get_unsafe_globals_in_checkpoint`` for zip files,
torch's own opcode scanner for legacy files), so a refusal names every offending global at once.

Globals the user allow-lists with ``--allow-global`` are rebuilt as inert placeholders
(:class:`AllowedGlobal`): their data is kept, none of their code runs. Only ``unsafe=True`` (the
CLI's ``--unsafe``) falls back to full pickle, which executes whatever the file contains.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import _weights_only_unpickler as wo_unpickler

from avdiag.errors import AvdiagError, UnreadableCheckpointError, UnsafeCheckpointError

# Research checkpoints store numpy scalars (accuracies) and arrays next to the weights. These globals
# only rebuild data, so they are admitted by default; the names cover numpy 1.x and 2.x pickles.
_NUMPY_DATA_GLOBALS: list[tuple[Any, str]] = []


def _numpy_data_globals() -> list[tuple[Any, str]]:
    if _NUMPY_DATA_GLOBALS:
        return _NUMPY_DATA_GLOBALS
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray

    items: list[tuple[Any, str]] = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        items.append((multiarray.scalar, f"{mod}.scalar"))
        items.append((multiarray._reconstruct, f"{mod}._reconstruct"))
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and name.endswith("DType"):
            items.append((cls, f"numpy.dtypes.{name}"))
    _NUMPY_DATA_GLOBALS.extend(items)
    return _NUMPY_DATA_GLOBALS


class NamedBytes(io.BytesIO):
    """In-memory pickle bytes that print as where they came from (for error lines)."""

    def __init__(self, data: bytes, label: str):
        super().__init__(data)
        self.label = label

    def __str__(self) -> str:
        return self.label


class AllowedGlobal(dict):
    """Stand-in for an allow-listed global: records its arguments and state, runs nothing.

    It is a dict so that pickled dict subclasses (e.g. hyper-parameter containers) keep their items.
    """

    _avdiag_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "AllowedGlobal":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<allowed {self._avdiag_name}>"


def _placeholder(full_name: str) -> tuple[type, str]:
    module, _, name = full_name.rpartition(".")
    if not module or not name:
        raise ValueError(full_name)
    cls = type(name, (AllowedGlobal,), {"__module__": module, "_avdiag_name": full_name})
    return cls, full_name


def validate_global_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", name):
        from avdiag.errors import UsageError

        raise UsageError(f"--allow-global wants a dotted name like pkg.module.Class, got {name!r}")
    return name


def _safe_globals(allow: list[str]) -> list[tuple[Any, str]]:
    return _numpy_data_globals() + [_placeholder(validate_global_name(n)) for n in allow]


def load_torch_pickle(path: Path | io.BytesIO, fmt: str, allow: list[str], unsafe: bool) -> Any:
    """torch.load ``path`` (zip files on disk memory-mapped) without executing code unless ``unsafe``."""
    mmap = fmt == "torch-zip" and isinstance(path, Path)
    if unsafe:
        return _torch_load(path, mmap=mmap, weights_only=False)
    with torch.serialization.safe_globals(_safe_globals(allow)):
        offending = _unsafe_globals(path, fmt)
        if offending:
            raise _refusal(path, offending)
        try:
            return _torch_load(path, mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            # A global pushed dynamically escapes the static scan; the unpickler still refuses it.
            raise _refusal(path, _names_in_message(str(e))) from e


def refuse_unsafe_bytes(data: bytes, label: str, allow: list[str]) -> None:
    """Raise UnsafeCheckpointError if the torch pickle ``data`` names globals outside the allow-list."""
    fmt = "torch-zip" if data[:4] in (b"PK\x03\x04", b"PK\x05\x06") else "torch-legacy"
    with torch.serialization.safe_globals(_safe_globals(allow)):
        try:
            offending = _unsafe_globals(NamedBytes(data, label), fmt)
        except UnreadableCheckpointError:
            offending = sorted(scan_globals(io.BytesIO(data)) - _allowed_names())
    if offending:
        raise _refusal(Path(label), offending)


def _torch_load(path: Path | io.BytesIO, mmap: bool, weights_only: bool) -> Any:
    if isinstance(path, io.BytesIO):
        path.seek(0)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # torch raises many kinds for damaged files
        raise UnreadableCheckpointError(f"{path}: cannot read torch checkpoint ({_first_line(e)})") from e


def _unsafe_globals(path: Path | io.BytesIO, fmt: str) -> list[str]:
    try:
        if fmt == "torch-zip":
            return _zip_unsafe_globals(path)
        return sorted(_legacy_globals(path) - _allowed_names())
    except (UnreadableCheckpointError, UnsafeCheckpointError):
        raise
    except Exception as e:
        raise UnreadableCheckpointError(f"{path}: cannot read torch checkpoint ({_first_line(e)})") from e


def _zip_unsafe_globals(path: Path | io.BytesIO) -> list[str]:
    source = str(path) if isinstance(path, Path) else path
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except RuntimeError:
        raise
    except Exception:
        # torch's scanner knows only the opcodes torch.save writes; a hand-made pickle may use others.
        # Disassemble it ourselves so the refusal can still name what it references.
        if isinstance(path, io.BytesIO):
            path.seek(0)
        with zipfile.ZipFile(path) as zf:
            record = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            names = scan_globals(io.BytesIO(zf.read(record)))
        return sorted(names - _allowed_names())


def _allowed_names() -> set[str]:
    return set(wo_unpickler._get_allowed_globals()) | set(wo_unpickler._get_user_allowed_globals())


def _legacy_globals(path: Path | io.BytesIO) -> set[str]:
    """Globals of the pickles at the head of a legacy torch file: magic, protocol, sys info, object."""
    with (open(path, "rb") if isinstance(path, Path) else contextlib.nullcontext(path)) as f:
        f.seek(0)
        return scan_globals(f, n_pickles=4)


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}


def scan_globals(stream: Any, n_pickles: int = 1) -> set[str]:
    """Globals named by the next ``n_pickles`` pickles in ``stream``, read by disassembly only."""
    found: set[str] = set()
    for _ in range(n_pickles):
        strings: list[str] = []
        memo: dict[int, str | None] = {}
        last: str | None = None
        for op, arg, _pos in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                found.add(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = last
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and memo.get(int(arg)) is not None:
                strings.append(memo[int(arg)])
            last = str(arg) if op.name in _STRING_OPS else None
            if last is not None:
                strings.append(last)
    return found


def refuse_raw_pickle(path: Path) -> AvdiagError:
    """The error for a plain pickle (not written by torch.save): unsafe when it names globals outside
    the weights-only allow-list, else unreadable as a checkpoint."""
    try:
        with open(path, "rb") as f:
            names = sorted(scan_globals(f) - _allowed_names())
    except Exception:
        names = []
    message = f"{path}: a plain pickle, not a torch checkpoint: refused"
    if names:
        return UnsafeCheckpointError(f"{message}; it references {', '.join(names)}", names)
    return UnreadableCheckpointError(message)


def _refusal(path: Path | io.BytesIO, names: list[str]) -> UnsafeCheckpointError:
    what = f"references globals outside torch's weights-only allow-list: {', '.join(names)}" if names else \
        "calls a function outside torch's weights-only allow-list"
    return UnsafeCheckpointError(
        f"{path}: refused: the pickle {what} (allow one with --allow-global NAME, or load with --unsafe "
        "only if you trust the file)",
        names,
    )


def _names_in_message(message: str) -> list[str]:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)) | set(re.findall(r"function <?([\w.]+)", message)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def read_zip_record(zf: zipfile.ZipFile, name: str) -> bytes:
    try:
        return zf.read(name)
    except (KeyError, zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        raise UnreadableCheckpointError(f"damaged archive: cannot read {name} ({_first_line(e)})") from e

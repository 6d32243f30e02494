"""Write a rewritten checkpoint back to disk: same format as the input, atomic, with provenance.

:func:`write_checkpoint` takes a loaded :class:`~avdiag.load.Checkpoint`, the tensors that changed or
were added (under their clean names), and writes a new file in which every other tensor is copied
bit for bit. Names get back the wrapper prefixes the file used (``module.``, ``_orig_mod.``), so a
training script's ``load_state_dict`` keeps working.

Output format
    ``fmt=None`` keeps the input's format, unless the target ends in ``.safetensors``:

    * torch zip -> ``torch.save`` of a shallow copy of the whole saved object, the state dict at
      ``ckpt.state_path`` replaced; optimizer, scheduler, epoch and other entries are kept (the
      optimizer's entries are removed with ``drop_optimizer=True``). A bare state dict stays bare.
    * legacy torch file -> legacy again (``_use_new_zipfile_serialization=False``).
    * safetensors -> safetensors (``safetensors.torch.save_file``), the input's metadata kept.
    * ``fmt="safetensors"`` (or a ``.safetensors`` target) -> one safetensors file, tensors under the
      names they had in the source state dict (wrapper prefixes included). This is the only output for
      sharded, TorchScript and torch.export inputs.
    * ``fmt="torch-zip"`` / ``"torch-legacy"`` from a safetensors input -> a bare state dict.

Where the provenance goes (a :class:`Provenance`, as plain JSON-able data)
    * safetensors: metadata entries ``avdiag.provenance`` (a JSON string) and ``avdiag.version``.
    * torch checkpoints whose state dict sits inside a dict (``{'model': ..., 'optimizer': ...}``):
      a top-level key ``avdiag_provenance`` holding a plain dict (str/int/float/bool/None/lists), which
      torch's weights-only loader reads.
    * bare torch state dicts: the state dict's ``_metadata`` OrderedDict (the one
      ``nn.Module.state_dict()`` attaches and ``load_state_dict`` tolerates) gets the key
      ``avdiag_provenance`` -> ``{"provenance": <JSON string>}``; ``_metadata`` is created if missing.

    When the input already carried avdiag provenance, the new record keeps it under ``"previous"``.
    :func:`read_provenance` reads any of the three back.

Safety
    The file is written to a temporary name in the target's folder (``.<target name>.avdiag-tmp-*``),
    flushed and fsynced, then renamed onto the target with ``os.replace`` and the folder fsynced: a
    crash or an exception leaves the target as it was (an exception also removes the temporary). The
    input is overwritten only with ``in_place=True``; symbolic links are replaced, never written
    through. Tensors are not copied: unchanged ones are the checkpoint's memory-mapped views.
"""

from __future__ import annotations

import copy
import json
import math
import os
import secrets
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from avdiag.errors import UsageError
from avdiag.load import Checkpoint, detect
from avdiag.load.pickle_safety import AllowedGlobal
from avdiag.load.readers import _SAFETENSORS_DTYPES

__all__ = ["Provenance", "write_checkpoint", "read_provenance", "OPTIMIZER_KEYS", "PROVENANCE_KEY",
           "SAFETENSORS_PROVENANCE_KEY", "SAFETENSORS_VERSION_KEY", "STALE_OPTIMIZER_WARNING", "TMP_MARKER"]

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_states")
PROVENANCE_KEY = "avdiag_provenance"
SAFETENSORS_PROVENANCE_KEY = "avdiag.provenance"
SAFETENSORS_VERSION_KEY = "avdiag.version"
TMP_MARKER = ".avdiag-tmp-"
STALE_OPTIMIZER_WARNING = "the optimizer state's moments are stale for the rewritten tensors (use --drop-optimizer)"

_TORCH_FORMATS = (detect.TORCH_ZIP, detect.TORCH_LEGACY)
_OUTPUT_FORMATS = (detect.SAFETENSORS, detect.TORCH_ZIP, detect.TORCH_LEGACY)
_SAFETENSORS_OK = frozenset(_SAFETENSORS_DTYPES.values())


@dataclass(frozen=True)
class Provenance:
    """What produced a rewritten checkpoint: method, its parameters, the source file's digest, avdiag's version.

    ``parameters`` is normalised to plain JSON-able data when the record is made (tuples and sets become
    lists, paths strings, non-finite floats the strings ``"nan"``/``"inf"``/``"-inf"``).
    """

    method: str
    parameters: dict
    source_sha256: str | None
    avdiag_version: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", _plain(dict(self.parameters)))

    @classmethod
    def for_checkpoint(cls, ckpt: Checkpoint, method: str, parameters: dict | None = None) -> "Provenance":
        """A record for rewriting ``ckpt``: hashes its file(s) and takes avdiag's version."""
        from avdiag._version import __version__
        from avdiag.load import sha256_of

        return cls(method, dict(parameters or {}), sha256_of(ckpt.files) if ckpt.files else None, __version__)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "parameters": copy.deepcopy(self.parameters),
            "source_sha256": self.source_sha256,
            "avdiag_version": self.avdiag_version,
        }


def write_checkpoint(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], target: Path, *, provenance: Provenance,
                     drop: set[str] | frozenset[str] = frozenset(), drop_optimizer: bool = False,
                     in_place: bool = False, fmt: str | None = None,
                     verify: Callable[[Path], None] | None = None) -> list[str]:
    """Write ``ckpt`` to ``target`` with ``tensors`` (clean name -> new tensor) changed or added and ``drop``
    removed; every other tensor is copied unchanged. Returns warnings, one line each.

    ``verify(path)`` runs on the finished temporary file before it replaces the target; if it raises,
    the temporary file is removed and the target (the input, with ``in_place``) is left as it was.

    Raises UsageError for a target that is the input (without ``in_place``), a missing folder, a format
    the input cannot be written as, or names that do not fit the checkpoint.
    """
    target = Path(target)
    drop = set(drop)
    out_fmt = _output_format(ckpt, target, fmt)
    warnings: list[str] = []
    _check_target(ckpt, target, in_place, warnings)
    names = _FileNames(ckpt)
    _check_names(ckpt, tensors, drop, names)
    record = provenance.to_dict()
    if out_fmt == detect.SAFETENSORS:
        payload, metadata = _safetensors_payload(ckpt, tensors, drop, names, record, warnings)
        _atomic_write_safetensors(target, payload, metadata, verify)
    else:
        obj = _torch_payload(ckpt, tensors, drop, names, record, drop_optimizer, warnings)
        atomic_write(target, _torch_writer(obj, legacy=out_fmt == detect.TORCH_LEGACY), verify)
    return warnings


def read_provenance(ckpt: Checkpoint) -> dict | None:
    """The avdiag provenance a checkpoint carries (written by :func:`write_checkpoint`), or None."""
    text: Any = ckpt.metadata.get(SAFETENSORS_PROVENANCE_KEY) if ckpt.metadata else None
    if text is None and isinstance(ckpt.root, Mapping):
        if ckpt.state_path:
            found = ckpt.root.get(PROVENANCE_KEY)
            return dict(found) if isinstance(found, Mapping) else None
        meta = getattr(ckpt.root, "_metadata", None)
        entry = meta.get(PROVENANCE_KEY) if isinstance(meta, Mapping) else None
        text = entry.get("provenance") if isinstance(entry, Mapping) else None
    if not isinstance(text, str):
        return None
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


# -- choosing what to write ---------------------------------------------------------------------------


def _output_format(ckpt: Checkpoint, target: Path, fmt: str | None) -> str:
    if fmt is not None and fmt not in _OUTPUT_FORMATS:
        raise UsageError(f"cannot write format {fmt!r} (choose one of {', '.join(_OUTPUT_FORMATS)})")
    if fmt is None:
        fmt = detect.SAFETENSORS if target.suffix == ".safetensors" else ckpt.format
    if fmt == detect.SAFETENSORS:
        return fmt
    if ckpt.format in _TORCH_FORMATS or ckpt.format == detect.SAFETENSORS:
        if ckpt.format in _TORCH_FORMATS and any(u.kind == "module" for u in ckpt.unwrapped):
            raise UsageError(f"{ckpt.path}: the weights come from a pickled nn.Module, which avdiag does not "
                             "write back; use --out something.safetensors")
        return fmt
    raise UsageError(f"{ckpt.path}: a {ckpt.format} checkpoint can only be written as one safetensors file; "
                     "use --out something.safetensors")


def _check_target(ckpt: Checkpoint, target: Path, in_place: bool, warnings: list[str]) -> None:
    if target.is_dir():
        raise UsageError(f"{target}: is a folder; name the file to write (e.g. --out {target}/model.safetensors)")
    if not target.parent.is_dir():
        raise UsageError(f"{target}: the folder {target.parent} does not exist")
    if not os.path.lexists(target):
        return
    for f in [ckpt.path, *ckpt.files]:
        if not _same_file(target, f):
            continue
        if not _same_file(f, ckpt.path) or ckpt.format == detect.SHARDED:
            raise UsageError(f"refusing to overwrite {f}, a file of the sharded input; write elsewhere")
        if not in_place:
            raise UsageError(f"refusing to overwrite the input {ckpt.path} (use --in-place)")
        if target.is_symlink():
            warnings.append(f"{target} was a symbolic link to {os.path.realpath(target)}: the link is replaced "
                            "by the rewritten file and the file it pointed to is unchanged")
        return


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _FileNames:
    """Clean name -> name to write: the file's own name, or for a new tensor the file's prefix added."""

    def __init__(self, ckpt: Checkpoint):
        self.known = dict(ckpt.original_names) or {n: n for n in ckpt.tensors.names()}
        for n in ckpt.tensors.names():
            self.known.setdefault(n, n)
        leading: set[str] = set()
        self.parents: dict[str, str] = {}
        for clean, raw in self.known.items():
            if raw.endswith(clean):
                leading.add(raw[: len(raw) - len(clean)])
            clean_parent, _, leaf = clean.rpartition(".")
            raw_parent, _, raw_leaf = raw.rpartition(".")
            if clean_parent and raw_parent and leaf == raw_leaf:
                self.parents.setdefault(clean_parent, raw_parent)
        self.prefix = leading.pop() if len(leading) == 1 else ""

    def __call__(self, clean: str) -> str:
        if clean in self.known:
            return self.known[clean]
        parts = clean.split(".")
        for i in range(len(parts) - 1, 0, -1):  # the deepest module that already has tensors in the file
            raw_parent = self.parents.get(".".join(parts[:i]))
            if raw_parent is not None:
                return raw_parent + "." + ".".join(parts[i:])
        return self.prefix + clean


def _check_names(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], drop: set[str], names: _FileNames) -> None:
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise UsageError(f"new tensors must map names to tensors, got {name!r}: {type(t).__name__}")
    both = sorted(drop & set(tensors))
    if both:
        raise UsageError(f"tensor {both[0]!r} is both rewritten and dropped")
    unknown = sorted(n for n in drop if n not in ckpt.tensors)
    if unknown:
        raise UsageError(f"cannot drop {unknown[0]!r}: the checkpoint has no such tensor")
    existing = {names(n) for n in ckpt.tensors.names()}
    for name in tensors:
        if name not in ckpt.tensors and names(name) in existing:
            raise UsageError(f"new tensor {name!r} would be written as {names(name)!r}, which the file already holds")


def _record_with_previous(record: dict, previous: Any) -> dict:
    if isinstance(previous, str):
        try:
            previous = json.loads(previous)
        except json.JSONDecodeError:
            previous = None
    if isinstance(previous, Mapping):
        record = dict(record, previous=_plain(dict(previous)))
    return record


# -- torch pickles --------------------------------------------------------------------------------------


def _torch_payload(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], drop: set[str], names: _FileNames,
                   record: dict, drop_optimizer: bool, warnings: list[str]) -> Any:
    if ckpt.format not in _TORCH_FORMATS:  # safetensors -> torch: a bare state dict
        sd: Any = OrderedDict((names(n), ckpt.tensors.get(n)) for n in ckpt.tensors.names())
        root: Any = sd
        containers: list[Any] = []
    else:
        placeholders = _find_placeholders(ckpt.root)
        if placeholders:
            raise UsageError(f"{ckpt.path}: holds objects rebuilt from --allow-global ({', '.join(placeholders)}), "
                             "which a torch file cannot restore; use --out something.safetensors")
        root = copy.copy(ckpt.root)
        containers = [root]
        node = root
        for step in ckpt.state_path:
            key = _child_key(node, step)
            child = copy.copy(node[key])
            node[key] = child
            containers.append(child)
            node = child
        sd = containers.pop()
    for clean, t in tensors.items():
        sd[names(clean)] = _plain_tensor(t)
    for clean in drop:
        del sd[names(clean)]
    if containers:
        for container in containers:
            found = [k for k in OPTIMIZER_KEYS if k in container]
            if drop_optimizer:
                for k in found:
                    del container[k]
            elif found and STALE_OPTIMIZER_WARNING not in warnings:
                warnings.append(STALE_OPTIMIZER_WARNING)
        root[PROVENANCE_KEY] = _record_with_previous(record, root.get(PROVENANCE_KEY))
        return root
    # A bare state dict: the provenance rides in _metadata, which load_state_dict tolerates.
    if not isinstance(sd, OrderedDict):
        sd = OrderedDict(sd)
        root = sd
    old = getattr(sd, "_metadata", None)
    meta = OrderedDict(old) if isinstance(old, Mapping) else OrderedDict()
    previous = meta.get(PROVENANCE_KEY)
    previous = previous.get("provenance") if isinstance(previous, Mapping) else None
    meta[PROVENANCE_KEY] = {"provenance": json.dumps(_record_with_previous(record, previous), sort_keys=True)}
    sd._metadata = meta
    return root


def _child_key(node: Any, step: str) -> Any:
    if step in node:
        return step
    for k in node:
        if str(k) == step:
            return k
    raise UsageError(f"cannot find the state dict entry {step!r} while writing")


def _find_placeholders(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor) or id(obj) in seen or depth > 50:
        return []
    seen.add(id(obj))
    found: list[str] = []
    if isinstance(obj, AllowedGlobal):
        found.append(obj._avdiag_name)
    if isinstance(obj, Mapping):
        items: Any = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    else:
        items = list(vars(obj).values()) if hasattr(obj, "__dict__") and not isinstance(obj, type) else []
    for item in items:
        for name in _find_placeholders(item, depth + 1, seen):
            if name not in found:
                found.append(name)
    return found


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if type(t) is not torch.Tensor:
        t = t.as_subclass(torch.Tensor)
    return t


def _torch_writer(obj: Any, legacy: bool) -> Callable[[Path, BinaryIO], None]:
    def write(tmp: Path, f: BinaryIO) -> None:
        if legacy:
            torch.save(obj, f, _use_new_zipfile_serialization=False)
        else:
            torch.save(obj, f)

    return write


# -- safetensors ----------------------------------------------------------------------------------------


def _safetensors_payload(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], drop: set[str], names: _FileNames,
                         record: dict, warnings: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    shared: set[tuple[int, int]] = set()
    clean_names = [n for n in ckpt.tensors.names() if n not in drop] + [n for n in tensors if n not in ckpt.tensors]
    for clean in clean_names:
        t = _plain_tensor(tensors[clean] if clean in tensors else ckpt.tensors.get(clean))
        if t.dtype not in _SAFETENSORS_OK or t.layout != torch.strided:
            raise UsageError(f"tensor {clean!r} ({t.dtype}, {t.layout}) cannot be stored in a safetensors file")
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if t.numel() and key in shared:  # tied weights: safetensors refuses storages shared between names
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            shared.add(key)
            t = t.contiguous()
        out[names(clean)] = t
    if ckpt.format == detect.SAFETENSORS:
        metadata = {str(k): str(v) for k, v in ckpt.metadata.items()}
    else:
        metadata = {"format": "pt"}
        left = [e for e in ckpt.extras if e != PROVENANCE_KEY]
        if left:
            shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
            warnings.append(f"a safetensors file holds only tensors: {shown} not written")
        if ckpt.format in (detect.TORCHSCRIPT, detect.TORCH_EXPORT):
            warnings.append(f"a safetensors file holds only the weights, not the {ckpt.format} program")
    previous = metadata.get(SAFETENSORS_PROVENANCE_KEY) or (
        read_provenance(ckpt) if ckpt.format in _TORCH_FORMATS else None)
    metadata[SAFETENSORS_PROVENANCE_KEY] = json.dumps(_record_with_previous(record, previous), sort_keys=True)
    metadata[SAFETENSORS_VERSION_KEY] = str(record.get("avdiag_version"))
    metadata.setdefault("format", "pt")
    return out, metadata


def _atomic_write_safetensors(target: Path, payload: dict[str, torch.Tensor], metadata: dict[str, str],
                              verify: Callable[[Path], None] | None = None) -> None:
    """save_file writes through a temporary of its own (``.tmpXXXX`` beside its output, renamed onto it), so it
    writes into a private folder with the avdiag temporary name; that folder's file then replaces the target."""
    from safetensors.torch import save_file

    folder = _make_temp_dir(target)
    try:
        inner = folder / target.name
        _wrap_os_errors(target, lambda: save_file(payload, str(inner), metadata=metadata))
        if verify is not None:
            verify(inner)
        _wrap_os_errors(target, lambda: _finish(inner, target, fsync=True))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- atomic replacement ---------------------------------------------------------------------------------


def atomic_write(target: Path, write: Callable[[Path, BinaryIO], None],
                 verify: Callable[[Path], None] | None = None) -> None:
    """Write ``target`` through a temporary file beside it: ``write(tmp_path, file)`` fills it, it is
    fsynced, ``verify(tmp_path)`` may check it, then it is renamed onto ``target``. On any failure the
    target is left as it was and the temporary removed; OSErrors become one-line UsageErrors."""
    tmp, fd = _make_temp_file(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(tmp, f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        _wrap_os_errors(target, lambda: _finish(tmp, target, fsync=False))
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise UsageError(f"{target}: cannot write ({e.strerror or e})") from e
        raise


def _make_temp_file(target: Path) -> tuple[Path, int]:
    """A new file beside ``target``, named ``.<name>.avdiag-tmp-<random>``, open for writing (mode from the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return _new_temp(target, lambda tmp: os.open(tmp, flags, 0o666))


def _make_temp_dir(target: Path) -> Path:
    """A new private folder beside ``target``, named like the temporary file."""
    return _new_temp(target, lambda tmp: os.mkdir(tmp, 0o700))[0]


def _new_temp(target: Path, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    for _ in range(100):
        tmp = target.parent / f".{target.name}{TMP_MARKER}{secrets.token_hex(6)}"
        try:
            return tmp, create(tmp)
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"{target}: cannot write into {target.parent} ({e.strerror or e})") from e
    raise UsageError(f"{target}: cannot create a temporary file in {target.parent}")


def _finish(tmp: Path, target: Path, fsync: bool) -> None:
    """Give ``tmp`` the mode the target had (or the umask's), fsync it unless already done, rename it onto
    ``target``, fsync the folder."""
    try:
        st = os.lstat(target)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except FileNotFoundError:
        mode = None
    os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename itself has happened
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _wrap_os_errors(target: Path, action: Callable[[], None]) -> None:
    try:
        action()
    except OSError as e:
        raise UsageError(f"{target}: cannot write ({e.strerror or e})") from e


# -- plain data -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data that torch's weights-only loader also accepts."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() <= 64:
        return _plain(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):
        try:
            return _plain(value.tolist())
        except (TypeError, ValueError):
            pass
    return str(value)

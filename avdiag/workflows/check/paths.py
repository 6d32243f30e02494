"""Which checkpoints the paths, folders and globs given to `avdiag check` name."""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avdiag.load import detect


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".pth.tar")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Target:
    path: Path
    root: Path | None  # the folder given on the command line that led here (None: a file or a glob)


def looks_like_checkpoint(path: Path) -> bool:
    """A checkpoint's name (``CHECKPOINT_SUFFIXES``) or first bytes (torch zip, legacy torch, safetensors)."""
    if path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if head.startswith(detect.LEGACY_MAGIC):
        return True
    if head.startswith(detect.ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
        return any(n == "data.pkl" or n.endswith(("/data.pkl", "/constants.pkl", "/models/model.json"))
                   for n in names)
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        return header_len <= size - 8
    return _is_torch_tar(path)


def _is_torch_tar(path: Path) -> bool:
    """The pre-1.0 ``torch.save`` tar format (members sys_info, storages, tensors, pickle)."""
    try:
        with open(path, "rb") as f:
            f.seek(257)
            if f.read(5) != b"ustar":
                return False
        with tarfile.open(path, mode="r:") as tar:
            return {"sys_info", "pickle"} <= set(tar.getnames())
    except (OSError, tarfile.TarError):
        return False


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        here = Path(dirpath)
        if any(name.endswith(".index.json") for name in filenames):
            out.append(here)  # a sharded checkpoint: the folder is one checkpoint; its files are shards
            continue
        out.extend(p for p in (here / name for name in sorted(filenames)) if p.is_file() and looks_like_checkpoint(p))
    return out


def expand(paths: list[str]) -> list[tuple[str, Any]]:
    """In argument order: ("file", Target) or ("unmatched", (pattern, reason))."""
    items: list[tuple[str, Any]] = []
    seen: set[Path] = set()

    def add(p: Path, root: Path | None) -> bool:
        key = p.resolve()
        if key in seen:
            return False
        seen.add(key)
        items.append(("file", Target(p, root)))
        return True

    for raw in paths:
        text = str(raw)
        p = Path(text)
        if p.is_dir():
            found = _walk(p)
            if not found:
                items.append(("unmatched", (text, "a folder without any checkpoint")))
            for f in found:
                add(f, p)
        elif p.exists():
            add(p, None)
        elif _GLOB_CHARS.search(text):
            matches = sorted(globlib.glob(text, recursive=True))
            found = []
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    found.extend((f, mp) for f in _walk(mp))
                elif mp.name.endswith(".index.json") or looks_like_checkpoint(mp):
                    found.append((mp, None))
            if not found:
                reason = (f"matches {len(matches)} path(s), none of them a checkpoint" if matches
                          else "matches no file")
                items.append(("unmatched", (text, reason)))
            for f, root in found:
                add(f, root)
        else:
            items.append(("unmatched", (text, "no such file or directory")))
    return items


def expand_paths(paths: list[str]) -> tuple[list[Path], list[str]]:
    """The checkpoints that ``paths`` (files, folders, globs) name, and the patterns that matched none.

    Folders are searched recursively (hidden folders skipped) for checkpoint-looking files (by name or
    first bytes); a folder holding a ``*.index.json`` is one sharded checkpoint. A file named
    explicitly is always returned. Each checkpoint appears once, in argument order.
    """
    items = expand(paths)
    return ([it.path for kind, it in items if kind == "file"], [it[0] for kind, it in items if kind == "unmatched"])


def display_path(path: Path | str) -> str:
    """The path as reports show it: relative to the cwd when inside it, posix separators."""
    p = Path(path)
    try:
        absolute = p.resolve() if p.is_absolute() else None
        if absolute is not None:
            p = absolute.relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        pass
    return os.path.normpath(str(p)).replace(os.sep, "/")


def path_keys(path: Path, root: Path | None) -> list[str]:
    """The spellings of ``path`` that policy globs match: as shown, absolute, relative to ``root``."""
    keys = [display_path(path)]
    try:
        absolute = path.resolve()
        keys.append(absolute.as_posix())
        keys.append(absolute.relative_to((root or Path.cwd()).resolve()).as_posix())
    except (ValueError, OSError):
        pass
    return keys


def path_glob(key: str, pattern: str) -> bool:
    """Whether a policy glob matches ``key`` ('*' crosses '/'; a trailing '/' means everything below)."""
    pattern = pattern.replace(os.sep, "/")
    if pattern.endswith("/"):
        pattern += "*"
    if pattern.startswith("./"):
        pattern = pattern[2:]
    return fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, pattern.replace("**/", ""))

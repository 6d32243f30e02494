"""Tell a checkpoint's format from its bytes, never from its file name."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from avdiag.errors import LfsPointerError, UnreadableCheckpointError

TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
SAFETENSORS = "safetensors"
SHARDED = "sharded"
TORCHSCRIPT = "torchscript"
TORCH_EXPORT = "torch-export"

FORMATS = (TORCH_ZIP, TORCH_LEGACY, SAFETENSORS, SHARDED, TORCHSCRIPT, TORCH_EXPORT)

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
# torch.save's legacy format starts with pickle protocol 2 and this magic number as a long.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
PICKLE_PROTO = 0x80
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def detect_format(path: Path) -> str:
    """Return one of FORMATS for ``path``, or raise UnreadableCheckpointError saying why not."""
    if not path.exists():
        raise UnreadableCheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        find_index(path)
        return SHARDED
    if path.name.endswith(".index.json"):
        return SHARDED
    size = path.stat().st_size
    if size == 0:
        raise UnreadableCheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(LFS_MAGIC):
        raise LfsPointerError(
            f"{path}: a Git LFS pointer, not the weights (run `git lfs pull` to fetch them)"
        )
    if head.startswith(ZIP_MAGICS):
        return _zip_kind(path)
    if head.startswith(LEGACY_MAGIC):
        return TORCH_LEGACY
    if _looks_like_safetensors(path, head, size):
        return SAFETENSORS
    if head[:1] == bytes([PICKLE_PROTO]):
        from avdiag.load.pickle_safety import refuse_raw_pickle

        raise refuse_raw_pickle(path)
    raise UnreadableCheckpointError(
        f"{path}: not a checkpoint format avdiag reads (first bytes {head[:8].hex()})"
    )


def _looks_like_safetensors(path: Path, head: bytes, size: int) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > size - 8 or header_len > SAFETENSORS_MAX_HEADER:
        raise UnreadableCheckpointError(
            f"{path}: safetensors header claims {header_len} bytes but the file has {size}"
        )
    return True


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        raise UnreadableCheckpointError(f"{path}: damaged zip archive ({e})") from e
    if any(n.endswith("/models/model.json") or n.endswith("/archive_format") for n in names):
        return TORCH_EXPORT
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return TORCHSCRIPT
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return TORCH_ZIP
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise UnreadableCheckpointError(
        f"{path}: a zip archive that is not a torch checkpoint (holds {len(names)} entries: {shown or 'none'})"
    )


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".tar")


def _hint(directory: Path) -> str:
    """Point at the checkpoints a folder holds: one to inspect, or `avdiag check` for all of them."""
    try:
        found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _CHECKPOINT_SUFFIXES)
    except OSError:
        return ""
    if len(found) == 1:
        return f"; it holds one checkpoint: avdiag inspect {found[0]}"
    if found:
        return f"; it holds {len(found)} checkpoints: avdiag check {directory} checks them all"
    return ""


def find_index(directory: Path) -> Path:
    """The Hugging Face style *.index.json of a sharded checkpoint folder."""
    indexes = sorted(directory.glob("*.index.json"))
    if not indexes:
        raise UnreadableCheckpointError(
            f"{directory}: a folder, not a sharded checkpoint (no *.index.json){_hint(directory)}")
    if len(indexes) > 1:
        preferred = [p for p in indexes if "safetensors" in p.name]
        if len(preferred) == 1:
            return preferred[0]
        raise UnreadableCheckpointError(
            f"{directory}: several index files ({', '.join(p.name for p in indexes)}); point at one"
        )
    return indexes[0]


def read_index(index_path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a Hugging Face index.json."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UnreadableCheckpointError(f"{index_path}: not a valid index.json ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UnreadableCheckpointError(f"{index_path}: weight_map must map tensor names to file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise UnreadableCheckpointError(f"{index_path}: shard {shard!r} is outside the folder")
    return weight_map

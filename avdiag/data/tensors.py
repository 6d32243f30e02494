"""Datasets stored as tensor files: ``.npz`` or ``.safetensors`` with one array per modality.

Arrays (keys): ``audio`` (N, F, T) or (N, 1, F, T); ``visual`` (N, 3, T, H, W) or (N, 3, H, W)
(read as T = 1); ``labels`` (N,) integers >= 0 (``label`` is accepted too); at least one modality.
Class names, optional: an ``.npz`` string array ``classes``, or the safetensors metadata entry
``classes`` holding a JSON list; otherwise ``"0" .. str(max label)``. Any other key is an error (a
misspelt modality would otherwise vanish silently). ``.npz`` files are read with
``allow_pickle=False``; safetensors cannot hold code. The file is read into memory once; items are
views of it, converted to float32 on access. A tensor file holds one split: ``split`` is recorded,
not used to select.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avdiag.data.base import AVDataset, DataError, DataOptions, check_split, make_item

TENSOR_SUFFIXES = (".npz", ".safetensors")
_KNOWN = ("audio", "visual", "labels", "label", "classes")


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"expected tensor file {path}") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{path}: holds object arrays (pickles), which avdiag does not load") from None
        raise DataError(f"unreadable .npz file {path}: {' '.join(str(exc).split())}") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise DataError(f"unreadable .npz file {path}: {' '.join(str(exc).split())}") from None
    classes = None
    if "classes" in arrays:
        c = arrays.pop("classes")
        if c.dtype.kind not in "US" or c.ndim != 1:
            raise DataError(f"{path}: 'classes' must be a 1-D string array, got {c.dtype} {c.shape}")
        classes = [x.decode() if isinstance(x, bytes) else str(x) for x in c.tolist()]
    return arrays, classes


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DataError(f"expected tensor file {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k).numpy() for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise DataError(f"unreadable .safetensors file {path}: {' '.join(str(exc).split())}") from None
    classes = None
    if "classes" in meta:
        try:
            classes = json.loads(meta["classes"])
        except json.JSONDecodeError:
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{path}: metadata 'classes' must be a JSON list of strings")
    return arrays, classes


class TensorFileDataset(AVDataset):
    name = "tensors"

    def __init__(self, path: Path, split: str = "train", options: DataOptions = DataOptions(),
                 spec: str | None = None):
        self.path = Path(path)
        self.split = check_split(split)
        self.spec = spec or str(path)
        options.validate()
        if self.path.suffix == ".npz":
            arrays, classes = _read_npz(self.path)
        else:
            arrays, classes = _read_safetensors(self.path)
        unknown = sorted(set(arrays) - set(_KNOWN))
        if unknown:
            raise DataError(f"{self.path}: unexpected array {unknown[0]!r}: expected audio, visual, "
                            "labels (and optionally classes)")
        labels = arrays.get("labels", arrays.get("label"))
        if labels is None:
            raise DataError(f"{self.path}: no 'labels' array (expected audio and/or visual plus labels)")
        if labels.ndim != 1 or labels.dtype.kind not in "iub":
            raise DataError(f"{self.path}: 'labels' must be a 1-D integer array, got {labels.dtype} "
                            f"{tuple(labels.shape)}")
        if labels.size and labels.min() < 0:
            raise DataError(f"{self.path}: 'labels' holds negative values")
        n = labels.shape[0]
        self.labels = labels.astype(np.int64)
        self.arrays: dict[str, np.ndarray] = {}
        for m in ("audio", "visual"):
            if m not in arrays:
                continue
            a = arrays[m]
            if a.dtype.kind not in "biuf":
                raise DataError(f"{self.path}: {m!r} must be numeric, got {a.dtype}")
            if a.shape[:1] != (n,):
                raise DataError(f"{self.path}: {m!r} has {a.shape[0] if a.ndim else 0} items, "
                                f"'labels' has {n}")
            if m == "audio":
                if a.ndim == 4 and a.shape[1] == 1:
                    a = a[:, 0]
                if a.ndim != 3:
                    raise DataError(f"{self.path}: 'audio' must be (N, F, T) or (N, 1, F, T), "
                                    f"got {tuple(a.shape)}")
            else:
                written = tuple(a.shape)
                if a.ndim == 4:
                    a = a[:, :, None]
                if a.ndim != 5 or a.shape[1] != 3:
                    hint = " (channels last? move the 3 to axis 1)" if written[-1] == 3 else ""
                    raise DataError(f"{self.path}: 'visual' must be (N, 3, T, H, W) or (N, 3, H, W), "
                                    f"got {written}{hint}")
            self.arrays[m] = a
        if not self.arrays:
            raise DataError(f"{self.path}: no 'audio' or 'visual' array")
        self.modalities = tuple(m for m in ("audio", "visual") if m in self.arrays)
        if classes is None:
            classes = [str(k) for k in range(int(self.labels.max()) + 1 if n else 0)]
        elif n and int(self.labels.max()) >= len(classes):
            raise DataError(f"{self.path}: label {int(self.labels.max())} but only {len(classes)} classes")
        self.classes = classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        tensors = {m: torch.from_numpy(np.array(a[i], dtype=np.float32)) for m, a in self.arrays.items()}
        return make_item(i, int(self.labels[i]), audio=tensors.get("audio"), visual=tensors.get("visual"))


def save_tensor_file(path: Path | str, labels: Any, audio: Any = None, visual: Any = None,
                     classes: list[str] | None = None) -> Path:
    """Write a tensor-file dataset (the inverse of :class:`TensorFileDataset`)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"labels": np.asarray(labels, dtype=np.int64)}
    if audio is not None:
        arrays["audio"] = np.ascontiguousarray(np.asarray(audio, dtype=np.float32))
    if visual is not None:
        arrays["visual"] = np.ascontiguousarray(np.asarray(visual, dtype=np.float32))
    if path.suffix == ".npz":
        if classes is not None:
            arrays["classes"] = np.asarray(classes, dtype=str)
        np.savez(path, **arrays)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path), metadata={"classes": json.dumps(classes)} if classes else None)
    else:
        raise DataError(f"tensor files end in .npz or .safetensors, got {path.name}")
    return path

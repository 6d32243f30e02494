"""The dataset contract shared by every reader: items, batches, options, errors, loaders.

Every dataset item is a dict ``{"audio": FloatTensor (F, T), "visual": FloatTensor (3, T, H, W),
"label": int, "index": int}``; a modality the dataset does not have is absent from the dict (never
``None``). :func:`collate` stacks items into ``{"audio": (B, F, T), "visual": (B, 3, T, H, W),
"label": (B,), "index": (B,)}``.

:func:`make_loader` samples deterministically: with ``limit`` it takes the first ``limit`` indices
of a permutation drawn from ``torch.Generator().manual_seed(seed)`` (in that order); without it, every
item in dataset order. Nothing is shuffled beyond that, and no reader draws random numbers per item,
so the same seed gives the same samples whatever ``num_workers`` is. A :class:`DataError` raised in
a worker process comes back to the caller as the same one-line :class:`DataError`.

Skipped rows: a reader that finds a listed item unusable (its files missing, too few frames, a damaged
wav or image) raises :class:`SkippedRow` instead, unless ``DataOptions(strict=True)``. The loader drops
such an item from its batch and records it in the dataset's :class:`SkipLog` (``dataset.skip_log``), so a
skip is never silent: ``dataset.report()`` lists it with its list row, clip and reason.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from avdiag.errors import DataError

MODALITIES = ("audio", "visual")
SPLITS = ("train", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataOptions:
    """Preprocessing knobs. ``None`` means the reader's documented default.

    ``image_size``: square resize (pixels). ``mean``/``std``: per-channel normalisation of [0, 1]
    pixels. ``sample_rate``: rate the spectrogram is computed at (research sets: the rate the wav files
    must have). ``n_fft``/``hop``: STFT. ``class_order``: e.g. ``"ogm"``/``"alphabetical"`` for
    CREMA-D. ``frames``: visual frames per item. ``seconds``: audio duration (tile/crop) where a
    reader has one. ``resample``: research sets only; resample wav files whose rate differs from the
    expected one (as the training code's ``librosa.load(sr=...)`` does) instead of refusing them.
    ``strict``: a row the reader would skip (missing or damaged files, too few frames) is an error
    instead. ``audio_start``: where the audio crop starts, in seconds from the start of the clip, for the
    readers that crop wav audio (default: the reader's documented choice).
    """

    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    sample_rate: int | None = None
    n_fft: int | None = None
    hop: int | None = None
    class_order: str | None = None
    frames: int | None = None
    seconds: float | None = None
    resample: bool = False
    strict: bool = False
    audio_start: float | None = None

    def validate(self) -> "DataOptions":
        for name in ("image_size", "sample_rate", "n_fft", "hop", "frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
                raise DataError(f"option {name} must be a positive integer, got {value!r}")
        if self.seconds is not None and not self.seconds > 0:
            raise DataError(f"option seconds must be positive, got {self.seconds!r}")
        if self.audio_start is not None and not 0 <= self.audio_start < float("inf"):
            raise DataError(f"option audio_start must be >= 0 seconds, got {self.audio_start!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise DataError(f"option {name} needs 3 values (R, G, B), got {len(value)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise DataError(f"option std must be positive, got {self.std}")
        return self

    def image_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (tuple(self.mean) if self.mean else IMAGENET_MEAN,
                tuple(self.std) if self.std else IMAGENET_STD)


class MediaError(DataError):
    """A listed file is missing, empty, truncated or cannot be decoded: the row is unusable, the
    dataset may still be fine (a reader turns this into :class:`SkippedRow` unless strict).
    ``kind``: ``"missing"`` or ``"damaged"``."""

    def __init__(self, message: str, kind: str = "damaged"):
        super().__init__(message)
        self.kind = kind


class SkippedRow(DataError):
    """A list row the reader leaves out; ``str()`` is the one-line error it is under ``strict``.
    ``kind``: ``missing``, ``too few frames``, ``damaged``, ``duplicate`` or ``no class``."""

    def __init__(self, message: str, row: int | None, clip: str | None, reason: str, kind: str):
        super().__init__(message)
        self.row, self.clip, self.reason, self.kind = row, clip, reason, kind

    def record(self, split: str) -> dict[str, Any]:
        return {"split": split, "row": self.row, "clip": self.clip, "kind": self.kind, "reason": self.reason}


SHOWN_SKIPS = 20  # rows listed in a report; the count covers them all


class SkipLog:
    """The rows a dataset left out, each once (a row found damaged on every pass is one skip)."""

    def __init__(self, split: str):
        self.split = split
        self._rows: dict[tuple[Any, Any], dict[str, Any]] = {}

    def add(self, skip: SkippedRow) -> None:
        self._rows.setdefault((skip.row, skip.clip), skip.record(self.split))

    def add_record(self, record: dict[str, Any]) -> None:
        self._rows.setdefault((record.get("row"), record.get("clip")), dict(record))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return sorted(self._rows.values(), key=lambda r: (r["row"] is None, r["row"] or 0, r["clip"] or ""))

    def __len__(self) -> int:
        return len(self._rows)

    def to_dict(self, shown: int = SHOWN_SKIPS) -> dict[str, Any]:
        return skipped_dict(self.rows, shown)


def skipped_dict(rows: list[dict[str, Any]], shown: int = SHOWN_SKIPS) -> dict[str, Any]:
    """``{"count", "by_kind", "rows"}``: how many rows were skipped, per kind, and the first ``shown``."""
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {"count": len(rows), "by_kind": by_kind, "rows": [dict(r) for r in rows[:shown]]}


class AVDataset(Dataset):
    """Base class of every avdiag dataset: a map-style torch Dataset of item dicts.

    ``name`` is a short label (``"cremad"``, ``"synthetic"`` ...), ``spec`` the string it was opened
    from, ``modalities`` the keys present in every item, ``classes`` the class names in label order
    (empty when unknown), ``split`` ``"train"`` or ``"test"``.
    """

    name: str = "dataset"
    spec: str = ""
    modalities: tuple[str, ...] = ()
    classes: list[str] = []
    split: str = "train"
    crops_audio: bool = False  # whether DataOptions.audio_start applies

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for reports."""
        return {"name": self.name, "spec": self.spec, "split": self.split, "size": len(self),
                "modalities": list(self.modalities), "classes": list(self.classes)}

    def clip_id(self, i: int) -> str | None:
        """The name of item ``i`` (its id in the list file, or its file name); None when items have none."""
        return None

    @property
    def skip_log(self) -> SkipLog:
        log = self.__dict__.get("_skip_log")
        if log is None:
            log = self.__dict__["_skip_log"] = SkipLog(self.split)
        return log

    def report(self) -> dict[str, Any]:
        """What was read: items, the rows left out (count, per kind, the first rows with their reason)."""
        listed = getattr(self, "n_listed", None)
        return {"name": self.name, "spec": self.spec, "split": self.split, "layout": getattr(self, "layout", None),
                "listed": listed if listed is not None else len(self) + len(self.skip_log),
                "items": len(self), "skipped": self.skip_log.to_dict()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec or self.name!r}, split={self.split!r}, "
                f"n={len(self)}, modalities={self.modalities}, classes={len(self.classes)})")

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return i % n


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def make_item(index: int, label: int, audio: torch.Tensor | None = None,
              visual: torch.Tensor | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if audio is not None:
        item["audio"] = audio
    if visual is not None:
        item["visual"] = visual
    item["label"] = int(label)
    item["index"] = int(index)
    return item


class Batch(dict):
    """A batch dict; ``skipped`` holds the records of the items of this batch the reader left out."""

    skipped: list[dict[str, Any]] = []


def collate(items: Sequence[dict[str, Any]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Stack item dicts into a batch dict; every item must have the same modalities and shapes.
    Skipped items are left out and recorded in the batch's ``skipped`` (the batch may be empty).
    Modality tensors come as ``dtype`` (float32; float64 for a float64 measurement)."""
    failed = [it for it in items if isinstance(it, _FailedItem)]
    if failed:
        return _FailedBatch(failed[0].message)  # type: ignore[return-value]
    skipped = [it.record for it in items if isinstance(it, _SkippedItem)]
    items = [it for it in items if not isinstance(it, _SkippedItem)]
    if not items:
        if skipped:
            empty = Batch()
            empty.skipped = skipped
            return empty
        raise DataError("cannot collate an empty batch")
    keys = [m for m in MODALITIES if m in items[0]]
    batch = Batch()
    batch.skipped = skipped
    for it in items:
        have = [m for m in MODALITIES if m in it]
        if have != keys:
            raise DataError(f"item {it.get('index')} has modalities {have}, item "
                            f"{items[0].get('index')} has {keys}: a batch needs the same in every item")
    for m in keys:
        shapes = {tuple(it[m].shape) for it in items}
        if len(shapes) > 1:
            detail = ", ".join(f"item {it.get('index')}: {tuple(it[m].shape)}" for it in items[:8])
            raise DataError(f"{m} tensors differ in shape within a batch ({detail}); "
                            "fix the data or pass options that make them equal")
        batch[m] = torch.stack([torch.as_tensor(it[m], dtype=torch.float32) for it in items]).to(dtype)
    batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return batch


class _FailedItem:
    """What a worker returns instead of raising, so the DataError arrives as one line."""

    def __init__(self, message: str):
        self.message = message


class _SkippedItem:
    """An item the reader left out (:class:`SkippedRow`), carried to collate as its record."""

    def __init__(self, record: dict[str, Any]):
        self.record = record


class _FailedBatch(dict):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def pin_memory(self) -> "_FailedBatch":
        """Nothing to pin: the loader's pin-memory step passes the failure (and its message) on."""
        return self


class _Guarded(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except SkippedRow as skip:
            return _SkippedItem(skip.record(getattr(self.dataset, "split", "")))
        except DataError as exc:
            return _FailedItem(str(exc))


class AVDataLoader(DataLoader):
    """A DataLoader that re-raises a worker's DataError as a plain one-line DataError."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        batches = super().__iter__()
        log = _skip_log_of(self.dataset)
        while True:
            with _single_thread(self.num_workers == 0):
                batch = next(batches, None)
            if batch is None:
                return
            if isinstance(batch, _FailedBatch):
                raise DataError(batch.message)
            for record in getattr(batch, "skipped", ()):
                if log is not None:
                    log.add_record(record)
            if "label" not in batch:  # every item of the batch was skipped
                continue
            yield batch


def _skip_log_of(dataset: Any) -> SkipLog | None:
    """The skip log of the dataset under a loader's Subset / guard wrappers (None for a plain Dataset)."""
    while not isinstance(dataset, AVDataset):
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return None
        dataset = inner
    return dataset.skip_log


@contextlib.contextmanager
def _single_thread(active: bool) -> Iterator[None]:
    """Item preprocessing is many small ops: OpenMP start-up dominates them with >1 thread
    (measured 40x slower on 2 cores), so batches built in the main process use one thread."""
    if not active:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample_indices(n: int, limit: int | None = None, seed: int = 0) -> list[int]:
    """The indices make_loader visits: all in order, or the first ``limit`` of a seeded permutation."""
    if limit is None:
        return list(range(n))
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[: min(int(limit), n)].tolist()


def pins_memory(device: str | torch.device | None) -> bool:
    """Whether batches bound for ``device`` are worth pinning: only for a CUDA device (page-locked
    host memory lets the copy to the GPU run asynchronously, overlapping with compute)."""
    return device is not None and torch.device(device).type == "cuda"


def make_loader(dataset: Dataset, batch_size: int = 32, num_workers: int = 0,
                limit: int | None = None, seed: int = 0, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> DataLoader:
    """A deterministic DataLoader over ``dataset`` (see the module docstring). ``device``: where the
    batches go; for a CUDA device they come in pinned memory. ``dtype``: of the modality tensors."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise DataError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(f"dataset {getattr(dataset, 'spec', '') or dataset!r} has no items")
    indices = sample_indices(n, limit, seed)
    source: Dataset = _Guarded(dataset)
    subset = torch.utils.data.Subset(source, indices)
    return AVDataLoader(subset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                        collate_fn=collate if dtype == torch.float32 else functools.partial(collate, dtype=dtype),
                        drop_last=False, pin_memory=pins_memory(device))


_ALIASES = {"audio": ("audio",), "visual": ("visual", "video", "image"), "label": ("label", "target")}


class AdaptedDataset(AVDataset):
    """Wraps a user's torch Dataset (``pkg.module:factory``) so its items follow the avdiag contract.

    Items may be dicts (``audio``, ``visual`` (or ``video``/``image``), ``label`` (or ``target``);
    other keys ignored) or ``(audio, visual, label)`` tuples with ``None`` for a missing modality.
    Tensors or arrays are converted to float32; audio (F, T) or (1, F, T); visual (3, T, H, W) or
    (3, H, W) (read as T = 1). Modalities are taken from the first item, which is checked eagerly.
    ``classes`` comes from the dataset's ``classes`` attribute, else ``num_classes``, else is empty.
    """

    name = "factory"

    def __init__(self, dataset: Any, split: str, spec: str):
        self.dataset = dataset
        self.split = check_split(split)
        self.spec = spec
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise DataError(f"{spec}: the factory returned a {type(dataset).__name__}, "
                            "expected a map-style torch Dataset (with __len__ and __getitem__)")
        classes = getattr(dataset, "classes", None)
        if classes is None and isinstance(getattr(dataset, "num_classes", None), int):
            classes = [str(c) for c in range(dataset.num_classes)]
        self.classes = [str(c) for c in classes] if classes is not None else []
        if len(self) == 0:
            raise DataError(f"{spec}: the dataset is empty")
        self.modalities = ()
        first = self[0]
        self.modalities = tuple(m for m in MODALITIES if m in first)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        raw = self.dataset[i]
        if isinstance(raw, dict):
            found = {}
            for key, names in _ALIASES.items():
                for n in names:
                    if n in raw and raw[n] is not None:
                        found[key] = raw[n]
                        break
        elif isinstance(raw, (tuple, list)) and len(raw) == 3:
            found = {k: v for k, v in zip(("audio", "visual", "label"), raw) if v is not None}
        else:
            raise DataError(f"{self.spec}: item {i} is a {type(raw).__name__}; items must be dicts "
                            "(audio, visual, label) or (audio, visual, label) tuples")
        if "label" not in found:
            raise DataError(f"{self.spec}: item {i} has no label")
        try:
            label = int(found["label"].item() if hasattr(found["label"], "item") else found["label"])
        except (TypeError, ValueError):
            raise DataError(f"{self.spec}: item {i} label {found['label']!r} is not an integer") from None
        tensors: dict[str, torch.Tensor] = {}
        for m in MODALITIES:
            if m not in found:
                continue
            try:
                t = torch.as_tensor(np.asarray(found[m]) if not torch.is_tensor(found[m]) else found[m])
            except (TypeError, ValueError, RuntimeError):
                raise DataError(f"{self.spec}: item {i} {m} is not an array") from None
            t = t.detach().to(torch.float32)
            if m == "audio" and t.dim() == 3 and t.shape[0] == 1:
                t = t[0]
            if m == "visual" and t.dim() == 3 and t.shape[0] == 3:
                t = t.unsqueeze(1)
            want = "(F, T) or (1, F, T)" if m == "audio" else "(3, T, H, W) or (3, H, W)"
            if (m == "audio" and t.dim() != 2) or (m == "visual" and (t.dim() != 4 or t.shape[0] != 3)):
                raise DataError(f"{self.spec}: item {i} {m} has shape {tuple(t.shape)}, expected {want}")
            tensors[m] = t
        if self.modalities and tuple(m for m in MODALITIES if m in tensors) != self.modalities:
            raise DataError(f"{self.spec}: item {i} has modalities {sorted(tensors)}, the first item "
                            f"has {list(self.modalities)}")
        return make_item(i, label, audio=tensors.get("audio"), visual=tensors.get("visual"))

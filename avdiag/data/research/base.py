"""What the research dataset readers share: the ``NAME:ROOT,...`` spec, the file layout a split was
found in, the dataset base class (reading the list, detecting the layout, skipping rows as the
reference loaders do, and saying so) and the tensor-file readers. The formats themselves are
described in :mod:`avdiag.data.research`."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from avdiag.data.audio import crop_from, log_spectrogram, read_wav_at, wav_problem
from avdiag.data.base import AVDataset, DataError, DataOptions, MediaError, SkippedRow, check_split, make_item
from avdiag.data.images import IMAGE_EXTENSIONS, list_frames, load_image, segment_starts, stack_frames
from avdiag.data.safe_pickle import load_array

SPEC_KEYS = ("audio", "frames", "list")
DETECT_ROWS = 50  # rows of a split tried per candidate layout
_OPTION = re.compile(r"([A-Za-z_]+)=(.*)")


@dataclass(frozen=True)
class ResearchSpec:
    """``ROOT`` and the explicit folders of ``NAME:ROOT,audio=DIR,frames=DIR,list=FILE``."""

    root: Path
    audio: str | None = None
    frames: str | None = None
    list: str | None = None

    def path(self, text: str, split: str) -> Path:
        path = Path(text.replace("{split}", split)).expanduser()
        return path if path.is_absolute() else self.root / path


def parse_research_spec(name: str, rest: str) -> ResearchSpec:
    """Split ``ROOT[,audio=DIR][,frames=DIR][,list=FILE]``; ROOT itself may hold commas."""
    parts = rest.split(",")
    options: dict[str, str] = {}
    while len(parts) > 1 and _OPTION.fullmatch(parts[-1].strip()):
        key, value = _OPTION.fullmatch(parts.pop().strip()).groups()  # type: ignore[union-attr]
        if key not in SPEC_KEYS:
            raise DataError(f"{name}:{rest}: unknown option {key!r}: expected audio=DIR, frames=DIR, list=FILE")
        if not value or key in options:
            raise DataError(f"{name}:{rest}: option {key} needs one value")
        options[key] = value
    root = ",".join(parts).strip()
    if not root:
        raise DataError(f"{name}:{rest}: expected {name}:ROOT")
    return ResearchSpec(Path(root).expanduser(), **options)


@dataclass(frozen=True)
class Layout:
    """Where a split's files are: ``{audio_dir}/{clip}{audio_ext}`` and ``{frames_dir}/{clip}{frame_suffix}/``."""

    audio_dir: Path
    audio_ext: str
    frames_dir: Path
    frame_suffix: str = ""

    def audio(self, clip: str) -> Path:
        return self.audio_dir / f"{clip}{self.audio_ext}"

    def frames(self, clip: str) -> Path:
        return self.frames_dir / f"{clip}{self.frame_suffix}"

    def describe(self, root: Path) -> str:
        return (f"audio {relative_path(self.audio_dir, root)}/{{clip}}{self.audio_ext}, "
                f"frames {relative_path(self.frames_dir, root)}/{{clip}}{self.frame_suffix}/")


def relative_path(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Entry:
    key: str       # clip id / file stem
    label: int
    row: int       # 1-based line in the list file


def count_images(folder: Path) -> int | None:
    """Image files in ``folder`` (None when it is not a folder)."""
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    except (FileNotFoundError, NotADirectoryError):
        return None


class ResearchDataset(AVDataset):
    """Common machinery: list rows, layout detection, row checks and the skip log, lazy items."""

    modalities = ("audio", "visual")
    default_frames = 1
    audio_dirs: tuple[str, ...] = ()
    frame_dirs: tuple[str, ...] = ()
    audio_exts: tuple[str, ...] = ()
    frame_suffixes: tuple[str, ...] = ("",)

    def __init__(self, root: Path | ResearchSpec, split: str, options: DataOptions, spec: str | None = None):
        self.where = root if isinstance(root, ResearchSpec) else ResearchSpec(Path(root))
        self.root = self.where.root
        self.split = check_split(split)
        self.options = options.validate()
        self.spec = spec or f"{self.name}:{self.root}"
        if not self.root.is_dir():
            raise DataError(f"{self.spec}: expected a dataset folder at {self.root}")
        self.frames = options.frames or self.default_frames
        self.image_size = options.image_size or 224
        self.mean, self.std = options.image_norm()
        self.list_file: Path = self.root
        self.entries: list[Entry] = []
        self.classes: list[str] = []
        self.n_listed = 0
        self._read_lists()
        if options.audio_start is not None and self.files.audio_ext != ".wav":
            raise DataError(f"{self.spec}: the audio is precomputed ({self.files.audio_ext} files), so it has no "
                            "crop: the audio start applies to wav files only")
        self._load_first()

    # -- subclass hooks
    def _read_lists(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def frames_needed(self) -> int:
        return self.frames

    # -- dataset protocol
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        entry = self.entries[i]
        try:
            audio, visual = self._load(entry)
        except MediaError as exc:
            raise self._skip(entry, str(exc), exc.kind) from None
        except DataError as exc:
            raise DataError(f"{exc} (listed in {self.list_file.name} row {entry.row})") from None
        return make_item(i, entry.label, audio=audio, visual=visual)

    def clip_id(self, i: int) -> str | None:
        return self.entries[self._check_index(i)].key

    # -- rows, layouts, checks
    def _skip(self, entry: Entry, message: str, kind: str) -> DataError:
        """The error of an unusable row: plain under strict, a SkippedRow (to be logged) otherwise."""
        full = f"{message} (listed in {self.list_file.name} row {entry.row})"
        if not full.startswith(f"{self.spec}: "):
            full = f"{self.spec}: {full}"
        if self.options.strict:
            return DataError(full)
        reason = message[len(self.spec) + 2:] if message.startswith(f"{self.spec}: ") else message
        return SkippedRow(full, entry.row, entry.key, reason, kind)

    def _load_first(self) -> None:
        """Read items from the first until one loads (eager check of the preprocessing); the rows that
        turn out damaged on the way are skipped."""
        while self.entries:
            try:
                self[0]
                return
            except SkippedRow as skip:
                self.skip_log.add(skip)
                del self.entries[0]
        self._nothing_left()

    def _nothing_left(self) -> None:
        rows = self.skip_log.rows
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.skip_log.to_dict()["by_kind"].items())
        first = f"; first: row {rows[0]['row']} {rows[0]['clip']}: {rows[0]['reason']}" if rows else ""
        raise DataError(f"{self.spec}: no {self.split} row of {self.list_file.name} is usable "
                        f"({self.n_listed} listed, {len(rows)} skipped: {kinds or 'none'}){first}")

    def _keep(self, entries: list[Entry], files: Layout) -> list[Entry]:
        """The entries whose files pass the open-time checks; the others are skipped (logged) or, under
        strict, the first is an error."""
        kept = []
        for entry in entries:
            problem = self._row_problem(entry.key, files)
            if problem is None:
                kept.append(entry)
                continue
            skip = self._skip(entry, *problem)
            if not isinstance(skip, SkippedRow):
                raise skip
            self.skip_log.add(skip)
        return kept

    def _row_problem(self, key: str, files: Layout) -> tuple[str, str] | None:
        """(message, kind) of what keeps the row of ``key`` out, from file names, sizes and headers."""
        audio = files.audio(key)
        try:
            size = audio.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return f"expected {audio}", "missing"
        if size == 0:
            return f"damaged audio file {audio}: empty file", "damaged"
        if files.audio_ext == ".wav":
            problem = wav_problem(audio)
            if problem is not None:
                return f"damaged wav file {audio}: {problem}", "damaged"
        folder = files.frames(key)
        n = count_images(folder)
        if n is None:
            return f"expected frame folder {folder}/", "missing"
        need = self.frames_needed()
        if n < need:
            return f"frame folder {folder}/ has {n} images, {need} needed", "too few frames"
        return None

    def _layout(self, keys: list[str], split: str | None = None) -> Layout:
        """The layout of ``split`` (default: this one): the explicit folders, or the candidate that has the
        files of the most of the first rows (ties: the first candidate whose folders exist)."""
        split = split or self.split
        candidates = self._candidates(split)
        sample = keys[:DETECT_ROWS]

        def score(files: Layout) -> tuple[int, int]:
            found = sum(1 for k in sample if files.audio(k).is_file() and files.frames(k).is_dir())
            return found, int(files.audio_dir.is_dir()) + int(files.frames_dir.is_dir())

        best = max(candidates, key=score)  # max keeps the first of equal scores
        if score(best)[1] == 0:
            tried = "; ".join(sorted({c.describe(self.root) for c in candidates}))
            raise DataError(f"{self.spec}: found no audio or frame folder of the {split} split: tried {tried} "
                            f"(or give the folders: {self.name}:ROOT,audio=DIR,frames=DIR)")
        return best

    def _candidates(self, split: str) -> list[Layout]:
        audio = [self.where.path(self.where.audio, split)] if self.where.audio else \
            [self.root / d.replace("{split}", split) for d in self.audio_dirs]
        frames = [self.where.path(self.where.frames, split)] if self.where.frames else \
            [self.root / d.replace("{split}", split) for d in self.frame_dirs]
        return [Layout(a, ext, f, suffix) for a, f in self._pairs(audio, frames)
                for ext in self.audio_exts for suffix in self.frame_suffixes]

    def _pairs(self, audio: list[Path], frames: list[Path]) -> list[tuple[Path, Path]]:
        """Audio and frame folders that go together (by default every combination)."""
        return [(a, f) for a in audio for f in frames]

    def _list_path(self, default: str) -> Path:
        return self.where.path(self.where.list, self.split) if self.where.list else self.root / default

    # -- readers
    def _rows(self, path: Path, min_fields: int, expected: str,
              split_row: Callable[[str], list[str]] | None = None) -> list[tuple[int, list[str]]]:
        if not path.is_file():
            raise DataError(f"{self.spec}: expected list file {path}")
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                if split_row is None:
                    reader = csv.reader(fh)
                    lines = ((reader.line_num, fields) for fields in reader)
                else:
                    lines = ((n, split_row(line)) for n, line in enumerate(fh, start=1))
                rows = []
                for line_num, fields in lines:
                    if not fields or all(not f.strip() for f in fields):
                        continue
                    fields = [f.strip() for f in fields]
                    if len(fields) < min_fields or not all(fields[:min_fields]):
                        raise DataError(f"{self.spec}: malformed row {line_num} in {path}: "
                                        f"expected {expected}, got {','.join(fields)!r}")
                    rows.append((line_num, fields))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.spec}: {path} is not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{self.spec}: malformed csv {path}: {exc}") from None
        return rows

    def _frames_from_listing(self, folder: Path) -> torch.Tensor:
        files = list_frames(folder, self.spec)
        if len(files) < self.frames:
            raise MediaError(f"{self.spec}: frame folder {folder}/ has {len(files)} images, "
                             f"{self.frames} needed", "too few frames")
        picks = [files[j] for j in segment_starts(len(files), self.frames)]
        return stack_frames([load_image(p, self.image_size, self.mean, self.std, self.spec) for p in picks])

    def _precomputed(self, path: Path) -> torch.Tensor:
        """A stored spectrogram (.pt, .npy or .pkl) as a float32 (F, T) tensor, leading 1-dims dropped."""
        if path.suffix == ".pt":
            spec = load_pt_tensor(path, self.spec)
        elif path.suffix == ".npy":
            spec = load_npy_array(path, self.spec)
        else:
            spec = load_array(path, self.spec)
        while spec.ndim > 2 and spec.shape[0] == 1:
            spec = spec[0]
        if spec.ndim != 2 or spec.dtype.kind not in "biuf" or spec.size == 0:
            raise MediaError(f"{self.spec}: {path} holds a {spec.dtype} array of shape "
                             f"{tuple(spec.shape)}, expected a 2-D spectrogram")
        spec = spec.astype(np.float32)
        if not np.isfinite(spec).all():
            raise MediaError(f"{self.spec}: {path} holds non-finite values")
        return torch.from_numpy(np.ascontiguousarray(spec))

    def _wav(self, path: Path, length: int, default_start: int) -> torch.Tensor:
        x = read_wav_at(path, self.rate, self.spec, self.options.resample)
        start = default_start if self.options.audio_start is None else int(round(self.options.audio_start * self.rate))
        return log_spectrogram(np.clip(self._cropped(x, start, length), -1.0, 1.0), self.n_fft, self.hop)

    def _cropped(self, x: np.ndarray, start: int, length: int) -> np.ndarray:
        return crop_from(x, start, length)

    def _class_order(self, allowed: tuple[str, ...]) -> str:
        order = self.options.class_order or allowed[0]
        if order not in allowed:
            raise DataError(f"{self.spec}: unknown class order {order!r} for {self.name}: "
                            f"expected one of {', '.join(allowed)}")
        return order

    def report(self) -> dict[str, Any]:
        return {**super().report(), "layout": self.files.describe(self.root), "list_file": str(self.list_file)}


def load_pt_tensor(path: Path, where: str) -> np.ndarray:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MediaError(f"{where}: expected {path}", "missing") from None
    except Exception as exc:  # truncated zips, foreign files, weights-only refusals: anything torch.load raises
        text = " ".join(str(exc).split())
        refused = re.search(r"unsupported GLOBAL (\S+)", text)
        if refused:  # a pickle that would call code: never run, and an error rather than a skipped row
            raise DataError(f"{where}: refused global {refused.group(1)} in {path}: only tensors are admitted "
                            "(the file was not executed)") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation", 1)[0].strip()
        raise MediaError(f"{where}: unreadable tensor file {path}: {detail[:200]}") from None
    if not torch.is_tensor(obj):
        raise MediaError(f"{where}: {path} holds a {type(obj).__name__}, expected a tensor")
    return obj.detach().float().numpy()


def load_npy_array(path: Path, where: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MediaError(f"{where}: expected {path}", "missing") from None
    except (ValueError, OSError, EOFError) as exc:
        raise MediaError(f"{where}: unreadable array file {path}: {' '.join(str(exc).split())}") from None


def is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

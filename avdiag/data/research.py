"""The research datasets as the OGM-GE family lays them out: CREMA-D, VGGSound, Kinetics-Sounds, AVE.

Spec: ``NAME:ROOT`` or ``NAME:ROOT,audio=DIR,frames=DIR,list=FILE`` (the options in any order, each
optional). ``DIR``/``FILE`` relative to ROOT unless absolute; ``{split}`` in them becomes ``train`` or
``test`` (e.g. ``audio=/data/vgg/{split}-audios/{split}-set``). Without them the layout is detected:
every candidate below is tried on the first listed rows of the split, and the one whose files are
there (audio file and frame folder) wins; the file extension (``.wav``/``.pt``/``.npy``/``.pkl``)
and the frame-folder suffix (``.mp4`` or none) are detected the same way. ``report()["layout"]``
says which was used.

* ``cremad``: ``train.csv`` / ``test.csv``, rows ``clip,label`` (no header; a UTF-8 BOM is fine).
  Audio ``AudioWAV/{clip}.wav`` (OGM-GE) or ``audio/{clip}.wav|.pt`` (MMPareto, Diagnosing &
  Re-learning, BalanceBenchmark: ``.pt`` holds a precomputed fbank/spectrogram tensor, read with
  ``torch.load(weights_only=True)`` and returned as stored, float32). A wav is read at 22.05 kHz,
  tiled to 3 s, clipped to [-1, 1], STFT n_fft 512 hop 353, ``log(|S| + 1e-7)`` -> (257, 188).
  (OGM-GE repeats the clip exactly 3 times and cuts at 3 s: the same for every clip of 1 s or more,
  i.e. all of CREMA-D; a shorter clip is repeated further here so that every item has the same
  shape.) Frames ``Image-01-FPS/{clip}/`` or ``visual/{clip}/``, 1 frame, 224 px, ImageNet
  normalisation -> (3, 1, 224, 224). Class order ``ogm`` (default: NEU, HAP, SAD, FEA, DIS, ANG, as
  in OGM-GE and BalanceBenchmark) or ``alphabetical`` (ANG, DIS, FEA, HAP, NEU, SAD: MMPareto,
  Diagnosing & Re-learning). A row is kept when its audio file and frame folder exist and the
  folder holds at least ``frames`` images (BalanceBenchmark's rule). Note: the CREMA-D release ships
  16 kHz wavs; OGM-GE's ``librosa.load(sr=22050)`` resamples them on load. avdiag refuses a rate
  other than the expected one unless resampling is asked for (``DataOptions(resample=True)``).
* ``vggsound``: ``vggsound.csv``, rows ``youtube_id,start_seconds,label,train|test`` (no header).
  Files, flat: ``audio/{id}_{start}.wav`` and ``Image-01-FPS/{id}_{start}.mp4/``; as OGM-GE's
  ``VGGSoundDataset`` reads them: ``train-audios/train-set/{id}_{start}.wav`` (``test-audios/test-set``)
  and ``train-videos/train-set-img/Image-01-FPS/{id}_{start}.mp4/`` (``test-videos/test-set-img``);
  either with ``.npy`` audio (a precomputed spectrogram, returned as stored: BalanceBenchmark) and
  frame folders without ``.mp4``. A row is kept when its audio file and frame folder exist and the
  folder holds more than 3 images (and at least ``frames``), as the reference loaders decide. Class
  index = order of first appearance of the label among the kept train rows, as OGM-GE builds it
  (among all listed train rows when no train folder is on disk; ``class_order`` ``alphabetical``
  sorts instead); a test row whose label has no kept train row is
  skipped. A wav is read at 16 kHz, doubled (``np.tile(x, 2)``) until it lasts >= 10 s, then a 5 s
  crop is taken, clipped to [-1, 1], STFT 256/128 -> (129, 626), 3 frames. The crop starts at
  ``audio_start`` seconds (default 2.5 s: the training code draws the start uniformly from [0, 5 s],
  2.5 s is the middle of that range, i.e. the centre crop of a 10 s clip); a start past the doubled
  clip repeats it further.
* ``ks`` (Kinetics-Sounds, 31 classes) and ``ave`` (28 classes): ``my_train.txt`` / ``my_test.txt``.
  OGM-GE form: rows ``id,10,label_idx`` (class names are the indices); audio
  ``audio_spec/{id}.pkl`` (a pickled numpy spectrogram, read with :mod:`avdiag.data.safe_pickle`;
  returned as stored, float32) or Kaldi-style fbank ``audio_spec/{id}.npy`` (read with
  ``allow_pickle=False``; zero-padded or cut to 1024 frames, then ``(x + 4.503877) / (2 * 5.141276)``;
  kept in its stored (1024, 128) orientation); frames ``visual/{id}/frame_0000{t}.jpg`` with
  ``t = seg * i + 1``, ``seg = n // 3`` for the n images in the folder (the test-time choice of the
  reference code); a folder with fewer than ``frames`` images is skipped. AVE as OGM-GE reads it:
  rows ``Category,id,...`` with ``stat.txt`` (one class name per row) next to the lists; classes
  are the sorted names; an id listed more than once is skipped (OGM-GE drops an id listed twice).
  BalanceBenchmark form (a list whose rows have no comma): ``name ... label`` separated by spaces,
  the label last; audio ``{name}.npy`` returned as stored; a folder needs more than 3 images; frame
  ``t = i * seg + max(seg // 2, 1)`` (``t = 1`` for all when the folder holds 6 images or fewer),
  BalanceBenchmark's test-time choice. Audio folders tried: ``audio_spec/``, ``audio/``,
  ``{split}_spec/``; frame folders: ``visual/``, ``frames/``.

Rows whose files are missing, whose frame folder has too few images, or whose wav file is empty,
truncated or not a wav (its chunk headers are read when the dataset is opened) are skipped, as the
reference loaders skip them, but never silently: each goes to the dataset's skip log with its list
row, clip and reason (``report()``). A file that turns out undecodable when the item is read (a
corrupt image, an unreadable tensor file) is skipped then, before any number is computed from it.
With ``DataOptions(strict=True)`` every such row is the one-line error instead. Nothing usable left
in a split is an error. Deterministic choices for diagnostics (the training code randomises them):
frames in natural file-name order at segment starts (:mod:`avdiag.data.images`), test-time resize
to 224 x 224 (bilinear), no flips or crops.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from avdiag.data.audio import crop_from, log_spectrogram, read_wav_at, wav_problem
from avdiag.data.base import (
    AVDataset, DataError, DataOptions, MediaError, SkippedRow, check_split, make_item,
)
from avdiag.data.images import IMAGE_EXTENSIONS, list_frames, load_image, segment_starts, stack_frames
from avdiag.data.safe_pickle import load_array

RESEARCH_NAMES = ("cremad", "vggsound", "ks", "ave")
CREMAD_OGM_ORDER = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
FBANK_MEAN, FBANK_STD, FBANK_FRAMES = -4.503877, 5.141276, 1024
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
        return (f"audio {_relative(self.audio_dir, root)}/{{clip}}{self.audio_ext}, "
                f"frames {_relative(self.frames_dir, root)}/{{clip}}{self.frame_suffix}/")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class _Entry:
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
        self.entries: list[_Entry] = []
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

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
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
    def _skip(self, entry: _Entry, message: str, kind: str) -> DataError:
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

    def _keep(self, entries: list[_Entry], files: Layout) -> list[_Entry]:
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
            spec = _load_pt(path, self.spec)
        elif path.suffix == ".npy":
            spec = _load_npy(path, self.spec)
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


def _load_pt(path: Path, where: str) -> np.ndarray:
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


def _load_npy(path: Path, where: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MediaError(f"{where}: expected {path}", "missing") from None
    except (ValueError, OSError, EOFError) as exc:
        raise MediaError(f"{where}: unreadable array file {path}: {' '.join(str(exc).split())}") from None


class CremaD(ResearchDataset):
    name = "cremad"
    crops_audio = True
    default_frames = 1
    audio_dirs = ("AudioWAV", "audio")
    frame_dirs = ("Image-01-FPS", "visual")
    audio_exts = (".wav", ".pt")

    def _read_lists(self) -> None:
        order = self._class_order(("ogm", "alphabetical"))
        self.classes = list(CREMAD_OGM_ORDER) if order == "ogm" else sorted(CREMAD_OGM_ORDER)
        index = {c: k for k, c in enumerate(self.classes)}
        self.list_file = self._list_path(f"{self.split}.csv")
        listed = []
        for row, fields in self._rows(self.list_file, 2, "clip,label (e.g. 1088_IOM_NEU_XX,NEU)"):
            clip, label = fields[0], fields[1].upper()
            if label not in index:
                raise DataError(f"{self.spec}: unknown label {fields[1]!r} in row {row} of "
                                f"{self.list_file}: expected one of {', '.join(CREMAD_OGM_ORDER)}")
            listed.append(_Entry(clip, index[label], row))
        self.n_listed = len(listed)
        self.files = self._layout([e.key for e in listed])
        self.entries = self._keep(listed, self.files)
        self.rate = self.options.sample_rate or 22050
        self.seconds = self.options.seconds or 3.0
        self.n_fft = self.options.n_fft or 512
        self.hop = self.options.hop or 353

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files.audio(entry.key)
        if self.files.audio_ext == ".wav":
            audio = self._wav(path, int(round(self.rate * self.seconds)), 0)
        else:
            audio = self._precomputed(path)
        return audio, self._frames_from_listing(self.files.frames(entry.key))


class VGGSound(ResearchDataset):
    name = "vggsound"
    crops_audio = True
    default_frames = 3
    reference_min_frames = 4  # the reference loaders keep a folder holding more than 3 images
    audio_dirs = ("audio", "{split}-audios/{split}-set")
    frame_dirs = ("Image-01-FPS", "{split}-videos/{split}-set-img/Image-01-FPS")
    audio_exts = (".wav", ".npy")
    frame_suffixes = (".mp4", "")

    def frames_needed(self) -> int:
        return max(self.reference_min_frames, self.frames)

    def _pairs(self, audio: list[Path], frames: list[Path]) -> list[tuple[Path, Path]]:
        if self.where.audio or self.where.frames:
            return super()._pairs(audio, frames)
        return list(zip(audio, frames))  # flat with flat, OGM-GE's train-/test- folders together

    def _read_lists(self) -> None:
        order = self._class_order(("appearance", "alphabetical"))
        self.list_file = self._list_path("vggsound.csv")
        rows = self._rows(self.list_file, 4, "youtube_id,start_seconds,label,train|test")
        listed: dict[str, list[tuple[_Entry, str]]] = {"train": [], "test": []}
        for row, fields in rows:
            vid, start, label, split = fields[:4]
            if split not in ("train", "test"):
                raise DataError(f"{self.spec}: malformed row {row} in {self.list_file}: split must "
                                f"be train or test, got {split!r}")
            try:
                float(start)
            except ValueError:
                raise DataError(f"{self.spec}: malformed row {row} in {self.list_file}: "
                                f"start_seconds must be a number, got {start!r}") from None
            listed[split].append((_Entry(f"{vid}_{start}", -1, row), label))
        train_labels = {label for _, label in listed["train"]}
        for entry, label in listed["test"]:
            if label not in train_labels:
                raise DataError(f"{self.spec}: label {label!r} in test row {entry.row} of {self.list_file} "
                                "never appears in a train row, so it has no class index")
        mine = listed[self.split]
        self.n_listed = len(mine)
        self.files = self._layout([e.key for e, _ in mine])
        kept = self._keep([e for e, _ in mine], self.files)
        train = [e for e, _ in listed["train"]]
        kept_train = kept if self.split == "train" else self._train_rows_on_disk(train)
        self.classes = self._first_appearance(kept_train, {e.row: lab for e, lab in listed["train"]})
        if order == "alphabetical":
            self.classes = sorted(self.classes)
        index = {c: k for k, c in enumerate(self.classes)}
        label_of = {e.row: lab for e, lab in mine}
        for entry in kept:
            label = label_of[entry.row]
            if label in index:
                self.entries.append(_Entry(entry.key, index[label], entry.row))
                continue
            skip = self._skip(entry, f"label {label!r} has no train row with its files, so no class index",
                              "no class")
            if not isinstance(skip, SkippedRow):
                raise skip
            self.skip_log.add(skip)
        self.rate = self.options.sample_rate or 16000
        self.seconds = self.options.seconds or 5.0
        self.n_fft = self.options.n_fft or 256
        self.hop = self.options.hop or 128

    def _train_rows_on_disk(self, train: list[_Entry]) -> list[_Entry]:
        """The train rows that set the class order of the test split: those with their files, as OGM-GE
        counts them (never an error or a skip of this split); all listed ones when no train folder exists."""
        try:
            files = self._layout([e.key for e in train], "train")
        except DataError:
            return train
        return [e for e in train if self._row_problem(e.key, files) is None]

    @staticmethod
    def _first_appearance(entries: list[_Entry], label_of_row: dict[int, str]) -> list[str]:
        seen: dict[str, None] = {}
        for e in entries:
            seen.setdefault(label_of_row[e.row], None)
        return list(seen)

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files.audio(entry.key)
        if self.files.audio_ext == ".wav":
            crop = int(round(self.rate * self.seconds))
            audio = self._wav(path, crop, crop // 2)   # default: middle of the draw range [0, crop]
        else:
            audio = self._precomputed(path)
        return audio, self._frames_from_listing(self.files.frames(entry.key))

    def _cropped(self, x: np.ndarray, start: int, length: int) -> np.ndarray:
        while x.size < 2 * length:                     # >= 10 s for the default 5 s crop
            x = np.tile(x, 2)
        return crop_from(x, start, length)


class KineticsSounds(ResearchDataset):
    name = "ks"
    n_classes = 31
    default_frames = 3
    audio_dirs = ("audio_spec", "audio", "{split}_spec")
    frame_dirs = ("visual", "frames")
    audio_exts = (".pkl", ".npy")
    reference_min_frames = 4  # BalanceBenchmark keeps a folder holding more than 3 images

    def frames_needed(self) -> int:
        return max(self.reference_min_frames, self.frames) if self.spaced else self.frames

    def _read_lists(self) -> None:
        self._class_order(("index",))
        self.list_file = self._list_path(f"my_{self.split}.txt")
        self.spaced = self._is_space_separated(self.list_file)
        if self.spaced:
            listed = self._spaced_rows()
        elif self.name == "ave" and (self.root / "stat.txt").is_file() and self._category_form():
            listed = self._category_rows()
        else:
            listed = self._index_rows()
        self.n_listed = len(listed)
        self.files = self._layout([e.key for e in listed])
        self.entries = self._keep(self._drop_duplicates(listed) if self.category_form else listed, self.files)

    def _is_space_separated(self, path: Path) -> bool:
        if not path.is_file():
            raise DataError(f"{self.spec}: expected list file {path}")
        try:
            with open(path, encoding="utf-8-sig") as fh:
                first = next((line for line in fh if line.strip()), "")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.spec}: {path} is not UTF-8 text ({exc.reason})") from None
        return "," not in first and len(first.split()) >= 2

    def _label_index(self, text: str, row: int, field: str = "label_idx") -> int:
        if not _is_int(text) or not 0 <= int(text) < self.n_classes:
            raise DataError(f"{self.spec}: malformed row {row} in {self.list_file}: {field} "
                            f"must be an integer in 0..{self.n_classes - 1}, got {text!r}")
        return int(text)

    def _index_rows(self) -> list[_Entry]:
        self.category_form = False
        self.classes = [str(k) for k in range(self.n_classes)]
        return [_Entry(fields[0], self._label_index(fields[2], row), row)
                for row, fields in self._rows(self.list_file, 3, "id,10,label_idx")]

    def _spaced_rows(self) -> list[_Entry]:
        self.category_form = False
        self.classes = [str(k) for k in range(self.n_classes)]
        rows = self._rows(self.list_file, 2, "name ... label (space-separated, label last)", str.split)
        return [_Entry(fields[0], self._label_index(fields[-1], row, "the last field (label)"), row)
                for row, fields in rows]

    def _category_form(self) -> bool:
        rows = self._rows(self.list_file, 2, "id,10,label_idx or Category,id,...")
        self.category_form = bool(rows) and not _is_int(rows[0][1][2] if len(rows[0][1]) > 2 else "")
        return self.category_form

    def _category_rows(self) -> list[_Entry]:
        stat = self._rows(self.root / "stat.txt", 1, "one class name per row")
        self.classes = sorted(fields[0] for _, fields in stat)
        index = {c: k for k, c in enumerate(self.classes)}
        entries = []
        for row, fields in self._rows(self.list_file, 2, "Category,id,..."):
            if fields[0] not in index:
                raise DataError(f"{self.spec}: unknown class {fields[0]!r} in row {row} of "
                                f"{self.list_file} (not in stat.txt)")
            entries.append(_Entry(fields[1], index[fields[0]], row))
        return entries

    def _drop_duplicates(self, entries: list[_Entry]) -> list[_Entry]:
        """OGM-GE's AVE loader drops an id listed twice (its second listing removes the first)."""
        counts: dict[str, int] = {}
        for e in entries:
            counts[e.key] = counts.get(e.key, 0) + 1
        kept = []
        for e in entries:
            if counts[e.key] == 1:
                kept.append(e)
                continue
            skip = self._skip(e, f"id {e.key} is listed {counts[e.key]} times", "duplicate")
            if not isinstance(skip, SkippedRow):
                raise skip
            self.skip_log.add(skip)
        return kept

    def _audio(self, key: str) -> torch.Tensor:
        spec = self._precomputed(self.files.audio(key))
        if self.files.audio_ext == ".npy" and not self.spaced:
            x = spec.numpy()
            if x.shape[0] < FBANK_FRAMES:
                x = np.pad(x, ((0, FBANK_FRAMES - x.shape[0]), (0, 0)))
            spec = torch.from_numpy(np.ascontiguousarray((x[:FBANK_FRAMES] - FBANK_MEAN) / (2 * FBANK_STD)))
        return spec

    def frame_numbers(self, n: int) -> list[int]:
        """The 1-based ``t`` of ``frame_0000{t}.jpg`` picked from a folder of ``n`` images."""
        seg = n // self.frames
        if not self.spaced:
            return [seg * i + 1 for i in range(self.frames)]
        if n <= 6:
            return [1] * self.frames
        return [i * seg + max(seg // 2, 1) for i in range(self.frames)]

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        audio = self._audio(entry.key)
        folder = self.files.frames(entry.key)
        files = list_frames(folder, self.spec)
        if len(files) < self.frames:
            raise MediaError(f"{self.spec}: frame folder {folder}/ has {len(files)} images, "
                             f"{self.frames} needed", "too few frames")
        paths = [folder / f"frame_0000{t}.jpg" for t in self.frame_numbers(len(files))]
        visual = stack_frames([load_image(p, self.image_size, self.mean, self.std, self.spec)
                               for p in paths])
        return audio, visual


class AVE(KineticsSounds):
    name = "ave"
    n_classes = 28


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


RESEARCH_CLASSES: dict[str, type[ResearchDataset]] = {
    "cremad": CremaD, "vggsound": VGGSound, "ks": KineticsSounds, "ave": AVE,
}


def open_research(name: str, root: Path | str | ResearchSpec, split: str, options: DataOptions,
                  spec: str | None = None) -> ResearchDataset:
    """``root``: a folder, a :class:`ResearchSpec`, or the text after ``NAME:`` (options included)."""
    if isinstance(root, str):
        root = parse_research_spec(name, root)
    return RESEARCH_CLASSES[name](root, split, options, spec)


def expected_shapes(name: str, options: DataOptions = DataOptions()) -> dict[str, tuple[int, ...]]:
    """Item shapes under ``options`` (KS/AVE audio is returned as stored, so it is not listed)."""
    size = options.image_size or 224
    defaults = {"cremad": (512, 353, 22050, 3.0, 1), "vggsound": (256, 128, 16000, 5.0, 3)}
    if name not in defaults:
        return {"visual": (3, options.frames or 3, size, size)}
    n_fft, hop, rate, seconds, frames = defaults[name]
    n_fft, hop = options.n_fft or n_fft, options.hop or hop
    n = int(round((options.sample_rate or rate) * (options.seconds or seconds)))
    return {"audio": (n_fft // 2 + 1, 1 + n // hop),
            "visual": (3, options.frames or frames, size, size)}


__all__ = ["RESEARCH_NAMES", "CREMAD_OGM_ORDER", "ResearchDataset", "ResearchSpec", "Layout", "CremaD",
           "VGGSound", "KineticsSounds", "AVE", "open_research", "parse_research_spec", "expected_shapes"]

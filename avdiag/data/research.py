"""The research datasets as the OGM-GE family prepares them: CREMA-D, VGGSound, Kinetics-Sounds, AVE.

Layouts (ROOT is the folder in ``cremad:ROOT`` etc.):

* ``cremad``: ``train.csv`` / ``test.csv``, rows ``clip,label`` (no header; a UTF-8 BOM is fine).
  Audio ``AudioWAV/{clip}.wav`` at 22.05 kHz, tiled to 3 s, clipped to [-1, 1], STFT n_fft 512 hop 353,
  ``log(|S| + 1e-7)`` -> (257, 188). (OGM-GE repeats the clip exactly 3 times and cuts at 3 s: the
  same for every clip of 1 s or more, i.e. all of CREMA-D; a shorter clip is repeated further here so
  that every item has the same shape.) Frames ``Image-01-FPS/{clip}/``, 1 frame, 224 px, ImageNet
  normalisation -> (3, 1, 224, 224). Class order ``ogm`` (default: NEU, HAP, SAD, FEA, DIS, ANG, as in
  OGM-GE) or ``alphabetical`` (ANG, DIS, FEA, HAP, NEU, SAD: MMPareto, Diagnosing & Re-learning).
  Note: the CREMA-D release ships 16 kHz wavs; OGM-GE's ``librosa.load(sr=22050)`` resamples them on
  load. avdiag refuses a rate other than the expected one unless resampling is asked for
  (``DataOptions(resample=True)``), so a mismatch never goes unnoticed.
* ``vggsound``: ``vggsound.csv``, rows ``youtube_id,start_seconds,label,train|test`` (no header).
  Class index = order of first appearance of the label among the train rows (``class_order``
  ``alphabetical`` sorts instead). Audio ``audio/{youtube_id}_{start_seconds}.wav`` (the csv text is
  used verbatim) at 16 kHz: doubled (``np.tile(x, 2)``) until it lasts >= 10 s, then a 5 s crop
  starting at 2.5 s (the training code draws the start uniformly from [0, 5 s]; 2.5 s is the middle
  of that range, i.e. the centre crop of a 10 s clip), clipped to [-1, 1], STFT 256/128 -> (129, 626).
  Frames ``Image-01-FPS/{youtube_id}_{start_seconds}.mp4/`` (the folder keeps ``.mp4``), 3 frames.
  OGM-GE keeps the train and test audio in separate folders of its own machine; avdiag reads both
  splits from one ``audio/`` folder next to ``vggsound.csv``.
* ``ks`` (Kinetics-Sounds, 31 classes) and ``ave`` (28 classes): ``my_train.txt`` / ``my_test.txt``,
  rows ``id,10,label_idx``; class names are the indices. Audio ``audio_spec/{id}.pkl`` (a pickled
  numpy spectrogram, read with :mod:`avdiag.data.safe_pickle`; returned as stored, float32) or, when
  the first listed item has no ``.pkl``, Kaldi-style fbank ``audio_spec/{id}.npy`` (read with
  ``allow_pickle=False``; zero-padded or cut to 1024 frames, then ``(x + 4.503877) / (2 * 5.141276)``;
  kept in its stored (1024, 128) orientation). Frames ``visual/{id}/frame_0000{t}.jpg`` with
  ``t = seg * i + 1``, ``seg = n // 3`` for the n images in the folder (the test-time choice of the
  reference code: 3 evenly spaced frames). AVE lists in the AVE_CVPR22 form ``Category,id,...`` are
  read too when ``stat.txt`` (one class name per row) is present: classes are then the sorted names.

Everywhere: rows are checked eagerly (every list row parsed, every label known) and the first item
is loaded eagerly; the files of the other items are checked when they are read, each error naming
the file that was expected and the list row that named it. Deterministic choices for diagnostics
(the training code randomises them): frames in natural file-name order at segment starts
(:mod:`avdiag.data.images`), test-time resize to 224 x 224 (bilinear), no flips or crops.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avdiag.data.audio import log_spectrogram, read_wav_at, tile_to
from avdiag.data.base import AVDataset, DataError, DataOptions, check_split, make_item
from avdiag.data.images import list_frames, load_image, segment_starts, stack_frames
from avdiag.data.safe_pickle import load_array

RESEARCH_NAMES = ("cremad", "vggsound", "ks", "ave")
CREMAD_OGM_ORDER = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
FBANK_MEAN, FBANK_STD, FBANK_FRAMES = -4.503877, 5.141276, 1024


@dataclass(frozen=True)
class _Entry:
    key: str       # clip id / file stem
    label: int
    row: int       # 1-based line in the list file


class ResearchDataset(AVDataset):
    """Common machinery: entries parsed from a list file, lazy per-item loading, error context."""

    modalities = ("audio", "visual")
    default_frames = 1

    def __init__(self, root: Path, split: str, options: DataOptions, spec: str | None = None):
        self.root = Path(root)
        self.split = check_split(split)
        self.options = options.validate()
        self.spec = spec or f"{self.name}:{root}"
        if not self.root.is_dir():
            raise DataError(f"{self.spec}: expected a dataset folder at {self.root}")
        self.frames = options.frames or self.default_frames
        self.image_size = options.image_size or 224
        self.mean, self.std = options.image_norm()
        self.list_file: Path = self.root
        self.entries: list[_Entry] = []
        self.classes: list[str] = []
        self._read_lists()
        if not self.entries:
            raise DataError(f"{self.spec}: {self.list_file} lists no {self.split} items")
        self[0]  # eager check of the first item

    # -- subclass hooks
    def _read_lists(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- dataset protocol
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        entry = self.entries[i]
        try:
            audio, visual = self._load(entry)
        except DataError as exc:
            raise DataError(f"{exc} (listed in {self.list_file.name} row {entry.row})") from None
        return make_item(i, entry.label, audio=audio, visual=visual)

    # -- helpers
    def _rows(self, path: Path, min_fields: int, expected: str) -> list[tuple[int, list[str]]]:
        if not path.is_file():
            raise DataError(f"{self.spec}: expected list file {path}")
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                reader = csv.reader(fh)
                rows = []
                for fields in reader:
                    if not fields or all(not f.strip() for f in fields):
                        continue
                    fields = [f.strip() for f in fields]
                    if len(fields) < min_fields or not all(fields[:min_fields]):
                        raise DataError(f"{self.spec}: malformed row {reader.line_num} in {path}: "
                                        f"expected {expected}, got {','.join(fields)!r}")
                    rows.append((reader.line_num, fields))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.spec}: {path} is not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{self.spec}: malformed csv {path}: {exc}") from None
        return rows

    def _frames_from_listing(self, folder: Path) -> torch.Tensor:
        where = self.spec
        files = list_frames(folder, where)
        if len(files) < self.frames:
            raise DataError(f"{where}: frame folder {folder}/ has {len(files)} images, "
                            f"{self.frames} needed")
        picks = [files[j] for j in segment_starts(len(files), self.frames)]
        return stack_frames([load_image(p, self.image_size, self.mean, self.std, where) for p in picks])

    def _class_order(self, allowed: tuple[str, ...]) -> str:
        order = self.options.class_order or allowed[0]
        if order not in allowed:
            raise DataError(f"{self.spec}: unknown class order {order!r} for {self.name}: "
                            f"expected one of {', '.join(allowed)}")
        return order


class CremaD(ResearchDataset):
    name = "cremad"
    default_frames = 1

    def _read_lists(self) -> None:
        order = self._class_order(("ogm", "alphabetical"))
        self.classes = list(CREMAD_OGM_ORDER) if order == "ogm" else sorted(CREMAD_OGM_ORDER)
        index = {c: k for k, c in enumerate(self.classes)}
        self.list_file = self.root / f"{self.split}.csv"
        for row, fields in self._rows(self.list_file, 2, "clip,label (e.g. 1088_IOM_NEU_XX,NEU)"):
            clip, label = fields[0], fields[1].upper()
            if label not in index:
                raise DataError(f"{self.spec}: unknown label {fields[1]!r} in row {row} of "
                                f"{self.list_file}: expected one of {', '.join(CREMAD_OGM_ORDER)}")
            self.entries.append(_Entry(clip, index[label], row))
        self.rate = self.options.sample_rate or 22050
        self.seconds = self.options.seconds or 3.0
        self.n_fft = self.options.n_fft or 512
        self.hop = self.options.hop or 353

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        x = read_wav_at(self.root / "AudioWAV" / f"{entry.key}.wav", self.rate, self.spec,
                        self.options.resample)
        x = np.clip(tile_to(x, int(round(self.rate * self.seconds))), -1.0, 1.0)
        audio = log_spectrogram(x, self.n_fft, self.hop)
        visual = self._frames_from_listing(self.root / "Image-01-FPS" / entry.key)
        return audio, visual


class VGGSound(ResearchDataset):
    name = "vggsound"
    default_frames = 3

    def _read_lists(self) -> None:
        order = self._class_order(("appearance", "alphabetical"))
        self.list_file = self.root / "vggsound.csv"
        rows = self._rows(self.list_file, 4, "youtube_id,start_seconds,label,train|test")
        train_labels: list[str] = []
        seen: set[str] = set()
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
            if split == "train" and label not in seen:
                seen.add(label)
                train_labels.append(label)
        self.classes = train_labels if order == "appearance" else sorted(train_labels)
        index = {c: k for k, c in enumerate(self.classes)}
        for row, fields in rows:
            vid, start, label, split = fields[:4]
            if split != self.split:
                continue
            if label not in index:
                raise DataError(f"{self.spec}: label {label!r} in test row {row} of {self.list_file} "
                                "never appears in a train row, so it has no class index")
            self.entries.append(_Entry(f"{vid}_{start}", index[label], row))
        self.rate = self.options.sample_rate or 16000
        self.seconds = self.options.seconds or 5.0
        self.n_fft = self.options.n_fft or 256
        self.hop = self.options.hop or 128

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        x = read_wav_at(self.root / "audio" / f"{entry.key}.wav", self.rate, self.spec,
                        self.options.resample)
        crop = int(round(self.rate * self.seconds))
        while x.size < 2 * crop:                       # >= 10 s for the default 5 s crop
            x = np.tile(x, 2)
        start = crop // 2                              # middle of the draw range [0, crop]
        x = np.clip(x[start:start + crop], -1.0, 1.0)
        audio = log_spectrogram(x, self.n_fft, self.hop)
        visual = self._frames_from_listing(self.root / "Image-01-FPS" / f"{entry.key}.mp4")
        return audio, visual


class KineticsSounds(ResearchDataset):
    name = "ks"
    n_classes = 31
    default_frames = 3

    def _read_lists(self) -> None:
        self._class_order(("index",))
        self.list_file = self.root / f"my_{self.split}.txt"
        if self.name == "ave" and (self.root / "stat.txt").is_file() and self.list_file.is_file():
            rows = self._rows(self.list_file, 2, "id,10,label_idx or Category,id,...")
            if rows and not _is_int(rows[0][1][2] if len(rows[0][1]) > 2 else ""):
                self._read_category_rows(rows)
                return
        self.classes = [str(k) for k in range(self.n_classes)]
        for row, fields in self._rows(self.list_file, 3, "id,10,label_idx"):
            if not _is_int(fields[2]) or not 0 <= int(fields[2]) < self.n_classes:
                raise DataError(f"{self.spec}: malformed row {row} in {self.list_file}: label_idx "
                                f"must be an integer in 0..{self.n_classes - 1}, got {fields[2]!r}")
            self.entries.append(_Entry(fields[0], int(fields[2]), row))
        self._choose_audio_format()

    def _read_category_rows(self, rows: list[tuple[int, list[str]]]) -> None:
        stat = self._rows(self.root / "stat.txt", 1, "one class name per row")
        self.classes = sorted(fields[0] for _, fields in stat)
        index = {c: k for k, c in enumerate(self.classes)}
        for row, fields in rows:
            if fields[0] not in index:
                raise DataError(f"{self.spec}: unknown class {fields[0]!r} in row {row} of "
                                f"{self.list_file} (not in stat.txt)")
            self.entries.append(_Entry(fields[1], index[fields[0]], row))
        self._choose_audio_format()

    def _choose_audio_format(self) -> None:
        if not self.entries:
            return
        first = self.entries[0].key
        pkl = self.root / "audio_spec" / f"{first}.pkl"
        npy = self.root / "audio_spec" / f"{first}.npy"
        if pkl.is_file() or not npy.is_file():
            self.audio_ext = ".pkl"
        else:
            self.audio_ext = ".npy"
        if not pkl.is_file() and not npy.is_file():
            raise DataError(f"{self.spec}: expected {pkl} (or fbank {npy.name}) "
                            f"(listed in {self.list_file.name} row {self.entries[0].row})")

    def _audio(self, key: str) -> torch.Tensor:
        path = self.root / "audio_spec" / f"{key}{self.audio_ext}"
        if self.audio_ext == ".pkl":
            spec = load_array(path, self.spec)
        else:
            try:
                spec = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                raise DataError(f"{self.spec}: expected {path}") from None
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"{self.spec}: unreadable fbank {path}: "
                                f"{' '.join(str(exc).split())}") from None
        spec = np.asarray(spec)
        while spec.ndim > 2 and spec.shape[0] == 1:
            spec = spec[0]
        if spec.ndim != 2 or spec.dtype.kind not in "biuf" or spec.size == 0:
            raise DataError(f"{self.spec}: {path} holds a {spec.dtype} array of shape "
                            f"{tuple(spec.shape)}, expected a 2-D spectrogram")
        spec = spec.astype(np.float32)
        if self.audio_ext == ".npy":
            if spec.shape[0] < FBANK_FRAMES:
                spec = np.pad(spec, ((0, FBANK_FRAMES - spec.shape[0]), (0, 0)))
            spec = (spec[:FBANK_FRAMES] - FBANK_MEAN) / (2 * FBANK_STD)
        if not np.isfinite(spec).all():
            raise DataError(f"{self.spec}: {path} holds non-finite values")
        return torch.from_numpy(np.ascontiguousarray(spec))

    def _load(self, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
        audio = self._audio(entry.key)
        folder = self.root / "visual" / entry.key
        files = list_frames(folder, self.spec)
        seg = len(files) // self.frames
        if seg == 0:
            raise DataError(f"{self.spec}: frame folder {folder}/ has {len(files)} images, "
                            f"{self.frames} needed")
        paths = [folder / f"frame_0000{seg * i + 1}.jpg" for i in range(self.frames)]
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


def open_research(name: str, root: Path, split: str, options: DataOptions,
                  spec: str | None = None) -> ResearchDataset:
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


__all__ = ["RESEARCH_NAMES", "CREMAD_OGM_ORDER", "ResearchDataset", "CremaD", "VGGSound",
           "KineticsSounds", "AVE", "open_research", "expected_shapes"]

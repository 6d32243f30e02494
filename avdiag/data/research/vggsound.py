"""VGGSound, flat or in OGM-GE's train-audios / train-videos tree, with wav or .npy audio (see
:mod:`avdiag.data.research`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avdiag.data.audio import crop_from
from avdiag.data.base import DataError, SkippedRow
from avdiag.data.research.base import Entry, ResearchDataset

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
        listed: dict[str, list[tuple[Entry, str]]] = {"train": [], "test": []}
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
            listed[split].append((Entry(f"{vid}_{start}", -1, row), label))
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
                self.entries.append(Entry(entry.key, index[label], entry.row))
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

    def _train_rows_on_disk(self, train: list[Entry]) -> list[Entry]:
        """The train rows that set the class order of the test split: those with their files, as OGM-GE
        counts them (never an error or a skip of this split); all listed ones when no train folder exists."""
        try:
            files = self._layout([e.key for e in train], "train")
        except DataError:
            return train
        return [e for e in train if self._row_problem(e.key, files) is None]

    @staticmethod
    def _first_appearance(entries: list[Entry], label_of_row: dict[int, str]) -> list[str]:
        seen: dict[str, None] = {}
        for e in entries:
            seen.setdefault(label_of_row[e.row], None)
        return list(seen)

    def _load(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
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

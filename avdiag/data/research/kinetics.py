"""Kinetics-Sounds and AVE, in OGM-GE's comma-separated and BalanceBenchmark's space-separated
lists (see :mod:`avdiag.data.research`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avdiag.data.base import DataError, MediaError, SkippedRow
from avdiag.data.images import list_frames, load_image, stack_frames
from avdiag.data.research.base import Entry, ResearchDataset, is_int

FBANK_MEAN, FBANK_STD, FBANK_FRAMES = -4.503877, 5.141276, 1024


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
        if not is_int(text) or not 0 <= int(text) < self.n_classes:
            raise DataError(f"{self.spec}: malformed row {row} in {self.list_file}: {field} "
                            f"must be an integer in 0..{self.n_classes - 1}, got {text!r}")
        return int(text)

    def _index_rows(self) -> list[Entry]:
        self.category_form = False
        self.classes = [str(k) for k in range(self.n_classes)]
        return [Entry(fields[0], self._label_index(fields[2], row), row)
                for row, fields in self._rows(self.list_file, 3, "id,10,label_idx")]

    def _spaced_rows(self) -> list[Entry]:
        self.category_form = False
        self.classes = [str(k) for k in range(self.n_classes)]
        rows = self._rows(self.list_file, 2, "name ... label (space-separated, label last)", str.split)
        return [Entry(fields[0], self._label_index(fields[-1], row, "the last field (label)"), row)
                for row, fields in rows]

    def _category_form(self) -> bool:
        rows = self._rows(self.list_file, 2, "id,10,label_idx or Category,id,...")
        self.category_form = bool(rows) and not is_int(rows[0][1][2] if len(rows[0][1]) > 2 else "")
        return self.category_form

    def _category_rows(self) -> list[Entry]:
        stat = self._rows(self.root / "stat.txt", 1, "one class name per row")
        self.classes = sorted(fields[0] for _, fields in stat)
        index = {c: k for k, c in enumerate(self.classes)}
        entries = []
        for row, fields in self._rows(self.list_file, 2, "Category,id,..."):
            if fields[0] not in index:
                raise DataError(f"{self.spec}: unknown class {fields[0]!r} in row {row} of "
                                f"{self.list_file} (not in stat.txt)")
            entries.append(Entry(fields[1], index[fields[0]], row))
        return entries

    def _drop_duplicates(self, entries: list[Entry]) -> list[Entry]:
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

    def _load(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
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

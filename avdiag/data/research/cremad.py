"""CREMA-D as OGM-GE, MMPareto, Diagnosing & Re-learning and BalanceBenchmark lay it out (see
:mod:`avdiag.data.research`)."""

from __future__ import annotations

import torch

from avdiag.data.base import DataError
from avdiag.data.research.base import Entry, ResearchDataset

CREMAD_OGM_ORDER = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


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
            listed.append(Entry(clip, index[label], row))
        self.n_listed = len(listed)
        self.files = self._layout([e.key for e in listed])
        self.entries = self._keep(listed, self.files)
        self.rate = self.options.sample_rate or 22050
        self.seconds = self.options.seconds or 3.0
        self.n_fft = self.options.n_fft or 512
        self.hop = self.options.hop or 353

    def _load(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files.audio(entry.key)
        if self.files.audio_ext == ".wav":
            audio = self._wav(path, int(round(self.rate * self.seconds)), 0)
        else:
            audio = self._precomputed(path)
        return audio, self._frames_from_listing(self.files.frames(entry.key))

"""Folders of images or wav files, for single-modality models: ``ROOT/{class}/{file}``.

The class of a file is the name of its sub-folder; classes are all the (non-hidden) sub-folder
names sorted, so label k is the k-th name in sorted order even when a class folder is empty (a test
split without some class keeps the model's indices); files within a class in natural name order. If ROOT
holds both ``train/`` and ``test/`` and they hold class folders, ``split`` picks one of them;
otherwise the folder is one split and ``split`` is only recorded. The kind is decided by the file
extensions found: images (.jpg .jpeg .png .bmp .gif .webp .tif .tiff) give a visual dataset, ``.wav``
an audio one; both kinds in one folder is an error. Other files (README, .DS_Store ...) are ignored.

Images: RGB, resized to ``image_size`` (default 224) x ``image_size`` with bilinear filtering,
normalised with ``mean``/``std`` (default ImageNet) -> visual (3, T, H, W), the image repeated
``frames`` times (default 1).

Wav files: mono, resampled with ``scipy.signal.resample_poly`` to ``sample_rate`` (default: the rate
of the first file), made ``seconds`` long (default: the duration of the first file) by tiling a
shorter clip and taking the centre of a longer one, then ``log(|STFT| + 1e-7)`` with ``n_fft``
(default 512) and ``hop`` (default 160) -> audio (n_fft // 2 + 1, 1 + samples // hop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avdiag.data.audio import centre_crop, log_spectrogram, read_wav, resample, tile_to
from avdiag.data.base import AVDataset, DataError, DataOptions, check_split, make_item
from avdiag.data.images import IMAGE_EXTENSIONS, load_image, natural_key

AUDIO_EXTENSIONS = (".wav",)


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def folder_kind(root: Path) -> str:
    """``"image"`` or ``"audio"`` from the extensions of the files in ROOT's class folders."""
    exts: set[str] = set()
    for d in _class_dirs(root):
        for p in d.iterdir():
            if p.is_file():
                exts.add(p.suffix.lower())
    images = exts & set(IMAGE_EXTENSIONS)
    audio = exts & set(AUDIO_EXTENSIONS)
    if images and audio:
        raise DataError(f"{root}: holds both images ({', '.join(sorted(images))}) and wav files; "
                        "a folder dataset has one modality")
    if images:
        return "image"
    if audio:
        return "audio"
    raise DataError(f"{root}: no class sub-folders with images or wav files "
                    "(expected ROOT/CLASS/FILE.jpg|png|wav)")


class FolderDataset(AVDataset):
    def __init__(self, root: Path, split: str = "train", options: DataOptions = DataOptions(),
                 spec: str | None = None):
        self.split = check_split(split)
        self.options = options.validate()
        root = Path(root)
        self.spec = spec or str(root)
        if not root.is_dir():
            raise DataError(f"{self.spec}: expected a folder at {root}")
        if (root / "train").is_dir() and (root / "test").is_dir() and _class_dirs(root / "train"):
            root = root / self.split
        self.root = root
        self.kind = folder_kind(root)
        exts = IMAGE_EXTENSIONS if self.kind == "image" else AUDIO_EXTENSIONS
        self.name = "image-folder" if self.kind == "image" else "wav-folder"
        self.modalities = ("visual",) if self.kind == "image" else ("audio",)
        self.classes = []
        self.files: list[tuple[Path, int]] = []
        for label, d in enumerate(_class_dirs(root)):
            files = sorted((p for p in d.iterdir() if p.is_file() and p.suffix.lower() in exts),
                           key=lambda p: natural_key(p.name))
            self.files.extend((p, label) for p in files)
            self.classes.append(d.name)
        if self.kind == "image":
            self.image_size = options.image_size or 224
            self.mean, self.std = options.image_norm()
            self.frames = options.frames or 1
        else:
            first, rate = read_wav(self.files[0][0], self.spec)
            self.rate = options.sample_rate or rate
            seconds = options.seconds or first.size / rate
            self.length = max(1, int(round(self.rate * seconds)))
            self.n_fft = options.n_fft or 512
            self.hop = options.hop or 160
        self[0]  # eager check of the first item

    def __len__(self) -> int:
        return len(self.files)

    def clip_id(self, i: int) -> str | None:
        path = self.files[self._check_index(i)][0]
        return f"{path.parent.name}/{path.name}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        path, label = self.files[i]
        if self.kind == "image":
            img = load_image(path, self.image_size, self.mean, self.std, self.spec)
            visual = img.unsqueeze(1).repeat(1, self.frames, 1, 1)
            return make_item(i, label, visual=visual)
        x, rate = read_wav(path, self.spec)
        x = resample(x, rate, self.rate)
        x = tile_to(x, self.length) if x.size < self.length else centre_crop(x, self.length)
        return make_item(i, label, audio=log_spectrogram(x, self.n_fft, self.hop))


__all__ = ["FolderDataset", "folder_kind", "AUDIO_EXTENSIONS"]

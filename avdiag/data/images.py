"""Images and frame folders with Pillow (torchvision does not work here).

* An image is opened with Pillow, fully decoded (so a truncated or corrupt file fails here, naming
  the file), converted to RGB, resized to ``size x size`` with bilinear filtering (what
  ``transforms.Resize(size=(224, 224))`` does to a PIL image in the OGM-GE family's test transform),
  scaled to [0, 1] and normalised per channel.
* Frame folders: frames are the image files of the folder in natural order (``frame_2`` before
  ``frame_10``). ``T`` frames are taken at the segment starts ``i * (n // T)``, i = 0 .. T-1
  (deterministic: the training code draws them at random; its test path for Kinetics-Sounds/AVE uses
  these segment starts). With ``T = 1`` that is the first frame.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from avdiag.data.base import MediaError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def load_image(path: Path, size: int | None, mean: Sequence[float], std: Sequence[float],
               where: str = "") -> torch.Tensor:
    """A normalised float32 (3, H, W) tensor; DataError naming the file if it is missing or corrupt."""
    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"{prefix}expected {path}", "missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise MediaError(f"{prefix}corrupt or unreadable image {path}: {text}") from None
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return to_tensor(np.asarray(rgb), mean, std)


def to_tensor(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised float32 (3, H, W)."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def list_frames(folder: Path, where: str = "") -> list[Path]:
    """Image files of a frame folder in natural order; DataError naming the folder if missing or empty."""
    prefix = f"{where}: " if where else ""
    try:
        names = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        raise MediaError(f"{prefix}expected frame folder {folder}/", "missing") from None
    if not names:
        raise MediaError(f"{prefix}frame folder {folder}/ holds no images")
    return sorted(names, key=lambda p: natural_key(p.name))


def segment_starts(n: int, frames: int) -> list[int]:
    """Indices ``i * (n // frames)``: the start of each of ``frames`` equal segments of ``n`` frames."""
    seg = n // frames
    return [seg * i for i in range(frames)]


def stack_frames(images: list[torch.Tensor]) -> torch.Tensor:
    """list of (3, H, W) -> (3, T, H, W)."""
    return torch.stack(images, dim=1)

"""A seeded synthetic audio-visual dataset whose per-modality informativeness can be dialled.

Spec: ``synthetic[:k=v,...]``, e.g. ``synthetic:n=256,classes=6,audio=0.9,visual=0.2,seed=0``.

Keys: ``n`` items per split (256), ``classes`` (6), ``audio`` and ``visual`` informativeness in
[0, 1] (1.0 each; ``off`` drops the modality), ``seed`` (0), ``f`` frequency bins (64) and ``t``
time frames (48) of the audio, ``size`` image side (32, or ``image_size`` of the options) and
``frames`` (1, or ``frames`` of the options) of the visual stream.

Informativeness p of a modality: every item's tensor for that modality shows the pattern of its own
class with probability p and the pattern of a uniformly drawn class otherwise (drawn independently
per modality). So the best accuracy any classifier can reach from that modality alone is
``p + (1 - p) / classes``: 0 = no class signal, 1 = every item clean; ``audio=0.9,visual=0.2`` makes
a strongly audio-dominated task. The patterns themselves are clear under the added noise.

Audio items look like log-magnitude spectrograms (F, T): a falling spectral floor around -6, the
class pattern adds a few harmonic bands with a class-specific temporal envelope, plus Gaussian
noise. Visual items (3, T, H, W) are roughly unit-scale, zero-mean like normalised images: a class
colour and an oriented grating, shifted a little between frames, plus noise.

Determinism: class patterns depend on ``seed`` only; labels on (``seed``, split); every item on
(``seed``, split, index) through its own ``torch.Generator``, so an item is the same whatever order
or worker reads it. Train and test share the patterns and differ in labels and noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from avdiag.data.base import AVDataset, DataError, DataOptions, check_split, make_item

DEFAULTS: dict[str, Any] = {"n": 256, "classes": 6, "audio": 1.0, "visual": 1.0, "seed": 0,
                            "f": 64, "t": 48, "size": None, "frames": None}
_INT_KEYS = ("n", "classes", "seed", "f", "t", "size", "frames")
_SPLIT_CODE = {"train": 1, "test": 2}
_MASK = (1 << 63) - 1


def parse_params(text: str) -> dict[str, Any]:
    """``k=v,k=v`` -> parameters with defaults filled in; DataError on unknown keys or bad values."""
    params = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise DataError(f"synthetic: expected key=value, got {part!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in DEFAULTS:
            raise DataError(f"synthetic: unknown key {key!r}: expected {', '.join(DEFAULTS)}")
        try:
            if key in _INT_KEYS:
                params[key] = int(value)
            elif value.lower() in ("off", "none"):
                params[key] = None
            else:
                params[key] = float(value)
        except ValueError:
            raise DataError(f"synthetic: {key} must be a number, got {value!r}") from None
    for key in ("audio", "visual"):
        p = params[key]
        if p is not None and not 0.0 <= p <= 1.0:
            raise DataError(f"synthetic: {key} informativeness must be in [0, 1] (or off), got {p}")
    if params["audio"] is None and params["visual"] is None:
        raise DataError("synthetic: at least one of audio, visual must be on")
    for key in ("n", "classes", "f", "t", "size", "frames"):
        if params[key] is not None and params[key] <= 0:
            raise DataError(f"synthetic: {key} must be positive, got {params[key]}")
    if params["classes"] < 2:
        raise DataError("synthetic: classes must be at least 2")
    return params


def _generator(*parts: int) -> torch.Generator:
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = ((h ^ (int(p) & _MASK)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & _MASK
    return torch.Generator().manual_seed(h)


class SyntheticDataset(AVDataset):
    name = "synthetic"

    def __init__(self, params: str | dict[str, Any] = "", split: str = "train",
                 options: DataOptions = DataOptions(), spec: str | None = None):
        self.split = check_split(split)
        options.validate()
        p = parse_params(params) if isinstance(params, str) else {**DEFAULTS, **params}
        self.params = p
        self.spec = spec or "synthetic"
        self.n, self.k, self.seed = p["n"], p["classes"], p["seed"]
        self.informativeness = {"audio": p["audio"], "visual": p["visual"]}
        self.modalities = tuple(m for m in ("audio", "visual") if p[m] is not None)
        self.classes = [f"class{c}" for c in range(self.k)]
        self.f, self.t = p["f"], p["t"]
        self.size = p["size"] or options.image_size or 32
        self.frames = p["frames"] or options.frames or 1
        code = _SPLIT_CODE[self.split]
        self.labels = torch.randint(self.k, (self.n,), generator=_generator(self.seed, code, 0))
        self._make_patterns()

    def _make_patterns(self) -> None:
        g = _generator(self.seed, 0, 1)
        f = torch.arange(self.f, dtype=torch.float32)
        t = torch.arange(self.t, dtype=torch.float32)
        self.floor = (-6.0 + 3.0 * torch.exp(-3.0 * f / self.f)).unsqueeze(1).expand(self.f, self.t)
        audio = torch.zeros(self.k, self.f, self.t)
        for c in range(self.k):
            f0 = 2.0 + torch.rand(1, generator=g).item() * self.f / 6.0
            profile = torch.zeros(self.f)
            for h in range(1, 4):
                profile += torch.exp(-0.5 * ((f - h * f0) / 1.2) ** 2) / h
            rate = 1.0 + 3.0 * torch.rand(1, generator=g).item()
            phase = 2 * math.pi * torch.rand(1, generator=g).item()
            envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * rate * t / self.t + phase)
            audio[c] = 3.0 * profile.unsqueeze(1) * envelope.unsqueeze(0)
        self.audio_patterns = audio
        s = self.size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        colours = torch.randn(self.k, 3, generator=g)
        angles = torch.rand(self.k, generator=g) * math.pi
        freqs = 2.0 + 3.0 * torch.rand(self.k, generator=g)
        self.visual_colours = colours
        self.visual_waves = (angles, freqs)
        self._grid = (xx, yy)

    def _visual_pattern(self, c: int, shift: float) -> torch.Tensor:
        xx, yy = self._grid
        angle, freq = self.visual_waves[0][c].item(), self.visual_waves[1][c].item()
        u = xx * math.cos(angle) + yy * math.sin(angle)
        wave = torch.sin(math.pi * freq * u + shift)
        return 0.8 * self.visual_colours[c].view(3, 1, 1) + 1.2 * wave.unsqueeze(0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        label = int(self.labels[i])
        g = _generator(self.seed, _SPLIT_CODE[self.split], i + 1)
        shown = {}
        for m in ("audio", "visual"):          # draw both so items do not depend on which are on
            clean = torch.rand(1, generator=g).item()
            other = int(torch.randint(self.k, (1,), generator=g))
            p = self.informativeness[m]
            shown[m] = label if (p is not None and clean < p) else other
        audio = visual = None
        gain = 0.8 + 0.4 * torch.rand(1, generator=g).item()
        noise_a = torch.randn(self.f, self.t, generator=g)
        if "audio" in self.modalities:
            audio = self.floor + gain * self.audio_patterns[shown["audio"]] + noise_a
        shifts = torch.rand(self.frames, generator=g) * 0.6
        noise_v = torch.randn(3, self.frames, self.size, self.size, generator=g)
        if "visual" in self.modalities:
            frames = [self._visual_pattern(shown["visual"], float(shifts[k])) for k in range(self.frames)]
            visual = torch.stack(frames, dim=1) + noise_v
        return make_item(i, label, audio=audio, visual=visual)

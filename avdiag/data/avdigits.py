"""AV digits: a small, real audio-visual dataset built offline (spoken digits + handwritten digits).

:func:`build_avdigits` speaks the words "zero" .. "nine" with many synthetic voices and pairs every
clip, by label, with a real handwritten digit from ``sklearn.datasets.load_digits()``:

* voices: espeak-ng dialects (en-us, en-gb, en-gb-scotland, en-gb-x-rp, en-029, en-gb-x-gbclan,
  en-gb-x-gbcwmd, en-us-nyc) x variants (+m3, +f2, +f4, +klatt, +croak) x two prosodies
  (150 words/min pitch 40, 185 words/min pitch 70), plus the flite voices kal, kal16, awb, rms, slt:
  85 voices, 850 clips. ``max_voices`` keeps that many voices spread evenly over this list (tiny
  builds for tests); ``voices`` gives an explicit list of specs such as ``"espeak-ng:en-gb+f2"``,
  ``"espeak-ng:en-us+m3:150:40"`` (speed, pitch) or ``"flite:slt"``.
* audio: the engine's wav (espeak-ng 22.05 kHz, flite 8 or 16 kHz) resampled to 16 kHz with
  ``scipy.signal.resample_poly``, silence trimmed (10 ms frames whose RMS is within 35 dB of the
  loudest frame, plus 20 ms either side), cut to its central 1 s if longer, centred in a 1 s clip
  with zeros, peak-normalised to 0.5, written as 16-bit PCM.
* images: load_digits' 8 x 8 images (0..16) scaled to 0..255, upsampled to 32 x 32 (bilinear), grey
  copied to RGB, written as PNG named by their load_digits index. Each class's images are split,
  after a seeded shuffle, 80/20 into disjoint train/test pools; the clips of a split take the images
  of their class from that split's pool in turn.
* split by VOICE: a seeded 20 % of the voices (at least one) are held out as the test split, so test
  accuracy measures generalisation to unseen voices (and unseen handwriting).

The output folder is self-describing: ``avdigits.json`` (manifest: classes, voices and their split,
counts, tool versions, preprocessing), ``wav/{clip}.wav``, ``images/{digit_index}.png``,
``train.csv`` / ``test.csv`` (header ``clip,label,voice,wav,image,digit_index``). It is built in a
temporary sibling folder and renamed into place at the end, so a failed build leaves nothing behind.

:class:`AVDigits` (``avdigits:DIR``) reads it: audio = ``log(|STFT| + 1e-7)`` of the 1 s clip, n_fft
256, hop 128 -> (129, 126); visual = the PNG, ``image_size`` (default 32, bilinear), ImageNet
mean/std by default -> (3, 1, 32, 32) (``frames`` > 1 repeats the image). Labels 0..9 = the digit.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.io import wavfile

from avdiag.data.audio import centre_crop, log_spectrogram, read_wav, read_wav_at, resample, tile_to
from avdiag.data.base import AVDataset, DataError, DataOptions, check_split, make_item
from avdiag.data.images import load_image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
ESPEAK_DIALECTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
                   "en-gb-x-gbcwmd", "en-us-nyc")
ESPEAK_VARIANTS = ("m3", "f2", "f4", "klatt", "croak")
ESPEAK_PROSODY = ((150, 40), (185, 70))
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
CSV_FIELDS = ("clip", "label", "voice", "wav", "image", "digit_index")
_TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite"}


@dataclass(frozen=True)
class Voice:
    engine: str            # "espeak-ng" or "flite"
    voice: str             # "en-gb+f2" / "slt"
    speed: int | None = None
    pitch: int | None = None

    @property
    def spec(self) -> str:
        extra = f":{self.speed}:{self.pitch}" if self.speed is not None else ""
        return f"{self.engine}:{self.voice}{extra}"

    @property
    def id(self) -> str:
        parts = [self.voice.replace("+", "_")]
        if self.speed is not None:
            parts += [f"s{self.speed}", f"p{self.pitch}"]
        prefix = "flite_" if self.engine == "flite" else ""
        return prefix + "_".join(parts)


def default_voices() -> list[Voice]:
    voices = [Voice("espeak-ng", f"{d}+{v}", s, p)
              for (s, p) in ESPEAK_PROSODY for d in ESPEAK_DIALECTS for v in ESPEAK_VARIANTS]
    return voices + [Voice("flite", v) for v in FLITE_VOICES]


def parse_voice(spec: str) -> Voice:
    """``espeak-ng:VOICE[:SPEED:PITCH]`` (``espeak:`` too) or ``flite:VOICE``."""
    engine, _, rest = spec.partition(":")
    engine = {"espeak": "espeak-ng"}.get(engine, engine)
    if engine not in _TOOLS or not rest:
        raise DataError(f"avdigits: bad voice {spec!r}: expected espeak-ng:VOICE[:SPEED:PITCH] "
                        "or flite:VOICE")
    parts = rest.split(":")
    if not re.fullmatch(r"[A-Za-z0-9_+.-]+", parts[0]):
        raise DataError(f"avdigits: bad voice name in {spec!r}")
    if engine == "flite":
        if len(parts) != 1:
            raise DataError(f"avdigits: flite voices take no speed/pitch: {spec!r}")
        return Voice("flite", parts[0])
    if len(parts) == 1:
        return Voice("espeak-ng", parts[0])
    try:
        speed, pitch = int(parts[1]), int(parts[2]) if len(parts) > 2 else 50
    except (ValueError, IndexError):
        raise DataError(f"avdigits: bad speed/pitch in {spec!r}") from None
    return Voice("espeak-ng", parts[0], speed, pitch)


def _check_tools(engines: set[str]) -> dict[str, str]:
    missing = sorted(e for e in engines if shutil.which(_TOOLS[e]) is None)
    if missing:
        raise DataError(f"avdigits needs {' and '.join(missing)}, not found on PATH: install the "
                        f"Debian package{'s' if len(missing) > 1 else ''} "
                        f"(apt-get install {' '.join(missing)})")
    versions = {}
    for e in sorted(engines):
        try:
            out = subprocess.run([_TOOLS[e], "--version"], capture_output=True, text=True, timeout=20)
            lines = [ln.strip() for ln in (out.stdout or out.stderr).splitlines() if ln.strip()]
            versions[e] = next((ln for ln in lines if "version" in ln.lower()), lines[0])[:120]
        except (OSError, subprocess.SubprocessError, IndexError):
            versions[e] = "unknown"
    return versions


def _synthesise(voice: Voice, word: str, out: Path) -> tuple[np.ndarray, int]:
    if voice.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice.voice]
        if voice.speed is not None:
            cmd += ["-s", str(voice.speed), "-p", str(voice.pitch)]
        cmd += ["-w", str(out), word]
    else:
        cmd = ["flite", "-voice", voice.voice, "-t", word, "-o", str(out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataError(f"avdigits: {voice.engine} failed for voice {voice.spec}: {exc}") from None
    if res.returncode != 0 or not out.is_file():
        msg = " ".join((res.stderr or res.stdout or "no output").split())[:200]
        raise DataError(f"avdigits: {voice.engine} failed for voice {voice.spec}: {msg}")
    return read_wav(out, "avdigits")


def _trim_and_centre(x: np.ndarray, rate: int) -> np.ndarray:
    x = resample(x, rate, SAMPLE_RATE)
    frame = SAMPLE_RATE // 100
    n = x.size // frame
    if n == 0:
        raise DataError("avdigits: the synthesiser produced an empty clip")
    rms = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(axis=1) + 1e-20)
    loud = np.nonzero(rms >= rms.max() * 10 ** (-35 / 20))[0]
    margin = SAMPLE_RATE // 50
    start = max(0, loud[0] * frame - margin)
    stop = min(x.size, (loud[-1] + 1) * frame + margin)
    clip = centre_crop(x[start:stop], int(SAMPLE_RATE * CLIP_SECONDS))
    peak = np.abs(clip).max()
    if peak <= 0:
        raise DataError("avdigits: the synthesiser produced a silent clip")
    return (clip * (0.5 / peak)).astype(np.float32)


def _spread(n_total: int, k: int) -> list[int]:
    if k >= n_total:
        return list(range(n_total))
    return sorted({int(round(j * (n_total - 1) / (k - 1))) for j in range(k)}) if k > 1 else [0]


def build_avdigits(out_dir: str | os.PathLike, *, voices: Sequence[str] | None = None,
                   max_voices: int | None = None, seed: int = 0, workers: int | None = None) -> Path:
    """Build the AV digits folder at ``out_dir`` (must not exist or be empty); returns its path."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"avdigits: {out} already exists and is not an empty folder")
    chosen = [parse_voice(v) for v in voices] if voices is not None else default_voices()
    if len({v.id for v in chosen}) != len(chosen):
        raise DataError("avdigits: the voice list has duplicates")
    if max_voices is not None:
        if max_voices < 2:
            raise DataError("avdigits: max_voices must be at least 2 (one train and one test voice)")
        chosen = [chosen[j] for j in _spread(len(chosen), max_voices)]
    if len(chosen) < 2:
        raise DataError("avdigits: at least 2 voices are needed (train and held-out test voices)")
    versions = _check_tools({v.engine for v in chosen})
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("avdigits needs scikit-learn for its handwritten digits "
                        "(pip install scikit-learn)") from None
    digits = load_digits()

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(chosen))
    n_test = max(1, int(round(TEST_FRACTION * len(chosen))))
    test_ids = {chosen[j].id for j in order[:n_test]}
    split_of = {v.id: ("test" if v.id in test_ids else "train") for v in chosen}

    pools: dict[str, dict[int, list[int]]] = {"train": {}, "test": {}}
    for c in range(10):
        idx = rng.permutation(np.nonzero(digits.target == c)[0]).tolist()
        cut = int(round(len(idx) * (1 - TEST_FRACTION)))
        pools["train"][c], pools["test"][c] = idx[:cut], idx[cut:]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "wav").mkdir()
        (tmp / "images").mkdir()
        scratch = tmp / "scratch"
        scratch.mkdir()
        jobs = [(v, c) for v in chosen for c in range(10)]

        def make_clip(job: tuple[Voice, int]) -> str:
            voice, c = job
            clip_id = f"{voice.id}_{c}"
            raw = scratch / f"{clip_id}.wav"
            x, rate = _synthesise(voice, WORDS[c], raw)
            raw.unlink()
            clip = _trim_and_centre(x, rate)
            wavfile.write(tmp / "wav" / f"{clip_id}.wav", SAMPLE_RATE,
                          np.round(clip * 32767).astype(np.int16))
            return clip_id

        n_workers = workers or max(2, min(8, 2 * (os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            clip_ids = list(pool.map(make_clip, jobs))
        scratch.rmdir()

        rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
        used_images: set[int] = set()
        counters = {(s, c): 0 for s in rows for c in range(10)}
        for (voice, c), clip_id in zip(jobs, clip_ids):
            s = split_of[voice.id]
            pool_c = pools[s][c]
            digit_index = pool_c[counters[(s, c)] % len(pool_c)]
            counters[(s, c)] += 1
            used_images.add(digit_index)
            rows[s].append({"clip": clip_id, "label": c, "voice": voice.spec,
                            "wav": f"wav/{clip_id}.wav", "image": f"images/{digit_index:04d}.png",
                            "digit_index": digit_index})
        from PIL import Image

        for k in sorted(used_images):
            grey = np.round(digits.images[k] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            img.convert("RGB").save(tmp / "images" / f"{k:04d}.png")
        for s, split_rows in rows.items():
            with open(tmp / f"{s}.csv", "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(split_rows)
        manifest = {
            "format": "avdigits", "version": 1,
            "description": "spoken digits (espeak-ng/flite voices) paired by label with handwritten "
                           "digits from sklearn.datasets.load_digits; train/test split by voice",
            "classes": [str(c) for c in range(10)], "words": list(WORDS),
            "sample_rate": SAMPLE_RATE, "clip_seconds": CLIP_SECONDS, "image_size": IMAGE_SIZE,
            "seed": seed, "test_fraction": TEST_FRACTION, "clips": len(clip_ids),
            "splits": {s: {"list": f"{s}.csv", "clips": len(r),
                           "voices": sorted({row["voice"] for row in r})} for s, r in rows.items()},
            "voices": [{"id": v.id, "spec": v.spec, "engine": v.engine, "voice": v.voice,
                        "speed": v.speed, "pitch": v.pitch, "split": split_of[v.id]} for v in chosen],
            "audio": "engine output resampled to 16 kHz (scipy.signal.resample_poly), silence "
                     "trimmed (-35 dB), centred in 1 s, peak 0.5, 16-bit PCM",
            "images": {"source": "sklearn.datasets.load_digits", "count": len(used_images),
                       "preprocessing": "0..16 -> 0..255, 8x8 -> 32x32 bilinear, grey -> RGB",
                       "pools": "per class, seeded 80/20 disjoint train/test pools"},
            "tools": versions, "python": sys.version.split()[0],
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "avdigits.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class AVDigits(AVDataset):
    name = "avdigits"
    modalities = ("audio", "visual")

    def __init__(self, root: Path, split: str = "train", options: DataOptions = DataOptions(),
                 spec: str | None = None):
        self.root = Path(root)
        self.split = check_split(split)
        self.options = options.validate()
        self.spec = spec or f"avdigits:{root}"
        manifest_path = self.root / "avdigits.json"
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.spec}: expected {manifest_path} (build the folder with "
                            "build_avdigits)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{self.spec}: unreadable manifest {manifest_path}: {exc}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != "avdigits":
            raise DataError(f"{self.spec}: {manifest_path} is not an avdigits manifest")
        self.classes = [str(c) for c in self.manifest.get("classes", [str(c) for c in range(10)])]
        self.rate = int(self.manifest.get("sample_rate", SAMPLE_RATE))
        self.length = int(round(self.rate * (options.seconds or self.manifest.get("clip_seconds", 1.0))))
        self.n_fft, self.hop = options.n_fft or 256, options.hop or 128
        self.image_size = options.image_size or int(self.manifest.get("image_size", IMAGE_SIZE))
        self.mean, self.std = options.image_norm()
        self.frames = options.frames or 1
        if options.sample_rate and options.sample_rate != self.rate:
            raise DataError(f"{self.spec}: the clips are {self.rate} Hz; sample_rate "
                            f"{options.sample_rate} is not available")
        self.list_file = self.root / f"{self.split}.csv"
        self.rows: list[tuple[int, dict[str, str]]] = []
        try:
            with open(self.list_file, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or not {"label", "wav", "image"} <= set(reader.fieldnames):
                    raise DataError(f"{self.spec}: {self.list_file} needs a header with "
                                    f"{','.join(CSV_FIELDS)}")
                for row in reader:
                    label = row.get("label") or ""
                    if not label.isdigit() or int(label) >= len(self.classes) or not row.get("wav") \
                            or not row.get("image"):
                        raise DataError(f"{self.spec}: malformed row {reader.line_num} in "
                                        f"{self.list_file}")
                    self.rows.append((reader.line_num, row))
        except FileNotFoundError:
            raise DataError(f"{self.spec}: expected list file {self.list_file}") from None
        if not self.rows:
            raise DataError(f"{self.spec}: {self.list_file} lists no items")
        self[0]

    def __len__(self) -> int:
        return len(self.rows)

    def clip_id(self, i: int) -> str | None:
        row = self.rows[self._check_index(i)][1]
        return row.get("clip") or Path(row["wav"]).stem

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        line, row = self.rows[i]
        try:
            x = read_wav_at(self.root / row["wav"], self.rate, self.spec, self.options.resample)
            x = tile_to(x, self.length) if x.size < self.length else centre_crop(x, self.length)
            audio = log_spectrogram(x, self.n_fft, self.hop)
            img = load_image(self.root / row["image"], self.image_size, self.mean, self.std, self.spec)
        except DataError as exc:
            raise DataError(f"{exc} (listed in {self.list_file.name} row {line})") from None
        visual = img.unsqueeze(1).repeat(1, self.frames, 1, 1)
        return make_item(i, int(row["label"]), audio=audio, visual=visual)


def _main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m avdiag.data.avdigits OUT_DIR [MAX_VOICES]")
        return 0 if argv else 2
    try:
        path = build_avdigits(argv[0], max_voices=int(argv[1]) if len(argv) > 1 else None)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((path / "avdigits.json").read_text())
    print(f"built {path}: {manifest['clips']} clips, {len(manifest['voices'])} voices, "
          f"{manifest['build_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

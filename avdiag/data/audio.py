"""Audio I/O and spectrograms in plain numpy/scipy/torch (torchaudio does not work here).

* a wav file's chunks are checked before its samples are read: an empty file, a file that is not
  RIFF/WAVE, a missing ``fmt``/``data`` chunk, a ``data`` chunk with no samples, or one whose header
  claims more bytes than the file holds (a truncated copy) is a :class:`MediaError` naming the file
  and the problem, never a clip read from what is left.
* wav files are read with ``scipy.io.wavfile``; integers are scaled to [-1, 1) the way soundfile
  (and so ``librosa.load``) does (int16 / 32768, int32 / 2**31, uint8 (x - 128) / 128); several
  channels are averaged to mono, as ``librosa.load(mono=True)`` does.
* Resampling, where a reader allows it, is ``scipy.signal.resample_poly`` (polyphase, Kaiser window).
  It is close to, not bit-identical with, librosa's resamplers.
* :func:`log_spectrogram` is ``log(|STFT| + 1e-7)`` with ``torch.stft``: periodic Hann window of
  ``n_fft`` samples, ``center=True`` with reflect padding (librosa's default before 0.10, which the
  OGM-GE family used), one-sided, so the shape is ``(n_fft // 2 + 1, 1 + len // hop)``.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.io import wavfile

from avdiag.data.base import DataError, MediaError

LOG_EPS = 1e-7
_CHUNK_HEADER = struct.Struct("<4sI")


def wav_problem(path: Path) -> str | None:
    """What makes ``path`` unusable as a wav file, read from its chunk headers only; None when the
    ``data`` chunk is present, non-empty and wholly inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if size == 0:
                return "empty file"
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return "not a RIFF/WAVE file"
            return _data_chunk_problem(fh, size, big_endian=head[:4] == b"RIFX")
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({_one_line(exc)})"


def _data_chunk_problem(fh, size: int, big_endian: bool) -> str | None:
    position, seen_fmt = 12, False
    header = struct.Struct(">4sI") if big_endian else _CHUNK_HEADER
    while position + 8 <= size:
        fh.seek(position)
        chunk, length = header.unpack(fh.read(8))
        if chunk == b"fmt ":
            seen_fmt = True
        if chunk == b"data":
            if not seen_fmt:
                return "no fmt chunk before the data chunk"
            if length == 0:
                return "no samples (empty data chunk)"
            held = size - position - 8
            if length > held:
                return f"truncated: the header claims {length} bytes of samples, the file holds {held}"
            return None
        position += 8 + length + (length & 1)
    return "no data chunk"


def read_wav(path: Path, where: str = "") -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate); MediaError naming the file when it is missing, damaged or
    unreadable (the chunk headers are checked first, see :func:`wav_problem`)."""
    prefix = f"{where}: " if where else ""
    problem = wav_problem(path)
    if problem == "missing":
        raise MediaError(f"{prefix}expected {path}", "missing")
    if problem is not None:
        raise MediaError(f"{prefix}damaged wav file {path}: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown chunks (LIST, cue ...) are harmless
            rate, data = wavfile.read(str(path), mmap=False)
    except FileNotFoundError:
        raise MediaError(f"{prefix}expected {path}", "missing") from None
    except (ValueError, OSError, EOFError, IndexError, TypeError) as exc:
        raise MediaError(f"{prefix}unreadable wav file {path}: {_one_line(exc)}") from None
    return to_float_mono(data, path, prefix), int(rate)


def to_float_mono(data: np.ndarray, path: Path | str = "", prefix: str = "") -> np.ndarray:
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype == np.int16:
        x = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        x = (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif data.dtype.kind == "f":
        x = data.astype(np.float32)
    else:
        raise MediaError(f"{prefix}unsupported wav sample type {data.dtype} in {path}")
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1 or x.size == 0:
        raise MediaError(f"{prefix}wav file {path} holds no samples")
    if not np.isfinite(x).all():
        raise MediaError(f"{prefix}wav file {path} holds non-finite samples")
    return np.ascontiguousarray(x)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x
    from scipy.signal import resample_poly  # imported here: scipy.signal takes ~0.5 s to import

    g = math.gcd(int(rate), int(target))
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def read_wav_at(path: Path, expected_rate: int, where: str, allow_resample: bool = False) -> np.ndarray:
    """Samples of ``path`` at ``expected_rate``; a different rate is an error unless resampling is allowed."""
    x, rate = read_wav(path, where)
    if rate != expected_rate:
        if not allow_resample:
            raise DataError(f"{where}: {path} is sampled at {rate} Hz, expected {expected_rate} Hz "
                            f"(convert the files to {expected_rate} Hz, or pass --resample)")
        x = resample(x, rate, expected_rate)
    return x


def crop_from(x: np.ndarray, start: int, length: int) -> np.ndarray:
    """``length`` samples of ``x`` from ``start``, the clip repeated end to end as far as needed."""
    return tile_to(x, start + length)[start:]


def tile_to(x: np.ndarray, length: int) -> np.ndarray:
    """Repeat ``x`` end to end until it has at least ``length`` samples (then cut to ``length``)."""
    reps = -(-length // x.size)
    return np.tile(x, reps)[:length]


def centre_crop(x: np.ndarray, length: int) -> np.ndarray:
    """The centred ``length`` samples of ``x``; zero-padded symmetrically when ``x`` is shorter."""
    if x.size >= length:
        start = (x.size - length) // 2
        return x[start:start + length]
    pad = length - x.size
    return np.pad(x, (pad // 2, pad - pad // 2))


def log_spectrogram(x: np.ndarray, n_fft: int, hop: int) -> torch.Tensor:
    """``log(|STFT(x)| + 1e-7)`` as float32 (n_fft // 2 + 1, 1 + len(x) // hop)."""
    if x.size <= n_fft // 2:
        # reflect padding needs more samples than half a window: repeat the clip
        x = tile_to(x, n_fft // 2 + 1)
    signal = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    spec = torch.stft(signal, n_fft=n_fft, hop_length=hop, win_length=n_fft,
                      window=torch.hann_window(n_fft), center=True, pad_mode="reflect",
                      return_complex=True)
    return torch.log(spec.abs() + LOG_EPS).float()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__

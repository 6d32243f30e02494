"""Writers of tiny fake datasets in each research layout, and factory datasets, for tests/test_data.py.

This is a helper module, not a test file. Every writer takes a folder (normally under pytest's
``tmp_path``) and creates the files a real dataset of that layout would have, with made-up content:
wav files written with scipy, JPEG frames with Pillow, the csv/txt lists, pickled spectrograms.
``write_malicious_pkl`` writes a pickle whose payload, if it ever ran, would create ``sentinel``.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.io import wavfile


# -- files ----------------------------------------------------------------------------------------

def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_wav(path: Path, seconds: float, rate: int, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A 16-bit mono tone; returns the float samples exactly as a reader should see them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.round(tone(seconds, rate, freq, seed=seed) * 32767).astype(np.int16)
    wavfile.write(path, rate, pcm)
    return pcm.astype(np.float32) / 32768.0


def write_jpeg(path: Path, grey: int, size: tuple[int, int] = (40, 30)) -> None:
    """A flat grey JPEG (flat images survive JPEG compression almost exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (grey, grey, grey)).save(path, quality=95)


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_corrupt_jpeg(path: Path) -> None:
    """The first 60 bytes of a real JPEG: a header and then nothing."""
    write_jpeg(path, 100)
    data = path.read_bytes()
    path.write_bytes(data[:60])


def write_rows(path: Path, rows: Iterable[Sequence[object]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        csv.writer(fh).writerows(rows)


# -- research layouts -----------------------------------------------------------------------------

CREMAD_TRAIN = [("1001_DFA_ANG_XX", "ANG"), ("1002_IEO_HAP_HI", "HAP"), ("1088_IOM_NEU_XX", "NEU")]
CREMAD_TEST = [("1003_TIE_SAD_XX", "SAD"), ("1004_ITS_DIS_XX", "DIS"), ("1005_MTI_FEA_LO", "FEA")]


def write_cremad(root: Path, train=CREMAD_TRAIN, test=CREMAD_TEST, rate: int = 22050,
                 seconds: float = 1.3, frames: int = 2) -> Path:
    """CREMA-D: train.csv/test.csv (with a BOM), AudioWAV/{clip}.wav, Image-01-FPS/{clip}/NNNNN.jpg.

    Frame k (1-based) of every clip is grey level 40 * k, so the chosen frame can be recognised.
    """
    write_rows(root / "train.csv", train, bom=True)
    write_rows(root / "test.csv", test, bom=True)
    for k, (clip, _) in enumerate(list(train) + list(test)):
        write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, rate, freq=200 + 50 * k, seed=k)
        for f in range(1, frames + 1):
            write_jpeg(root / "Image-01-FPS" / clip / f"{f:05d}.jpg", 40 * f)
    return root


VGGSOUND_ROWS = [
    ("vidA", "0", "dog barking", "test"),
    ("vidB", "30", "cat meowing", "train"),
    ("vidC", "10", "dog barking", "train"),
    ("vidD", "5", "cat meowing", "test"),
    ("vidE", "0", "playing guitar, slide", "train"),
    ("vidF", "20", "playing guitar, slide", "test"),
]


def write_vggsound(root: Path, rows=VGGSOUND_ROWS, rate: int = 16000, seconds: float = 3.0,
                   frames: int = 4) -> Path:
    """VGGSound: vggsound.csv, audio/{id}_{start}.wav, Image-01-FPS/{id}_{start}.mp4/frame_k.jpg."""
    write_rows(root / "vggsound.csv", rows)
    for k, (vid, start, _, _) in enumerate(rows):
        write_wav(root / "audio" / f"{vid}_{start}.wav", seconds, rate, freq=300 + 40 * k, seed=k)
        for f in range(1, frames + 1):
            write_jpeg(root / "Image-01-FPS" / f"{vid}_{start}.mp4" / f"frame_{f}.jpg", 30 * f)
    return root


KS_TRAIN = [("-3Mwkq-7TV4_2", 23), ("04fLIUMTbco_6", 0), ("08FtV5EYItw_64", 30)]
KS_TEST = [("0BSttGHc6jw_15", 10), ("1Wi0spEZAa8_2", 17)]


def write_ks(root: Path, train=KS_TRAIN, test=KS_TEST, audio: str = "pkl", n_frames: int = 10,
             spec_shape: tuple[int, int] = (257, 20), protocol: int = 4) -> Path:
    """Kinetics-Sounds/AVE: my_train.txt/my_test.txt rows ``id,10,label``, audio_spec/{id}.pkl
    (or fbank .npy), visual/{id}/frame_0000{t}.jpg with frame t at grey level 20 * t."""
    write_rows(root / "my_train.txt", [(i, 10, lab) for i, lab in train])
    write_rows(root / "my_test.txt", [(i, 10, lab) for i, lab in test])
    for k, (vid, _) in enumerate(list(train) + list(test)):
        (root / "audio_spec").mkdir(parents=True, exist_ok=True)
        if audio == "pkl":
            spec = np.random.default_rng(k).normal(size=spec_shape).astype(np.float64)
            with open(root / "audio_spec" / f"{vid}.pkl", "wb") as fh:
                pickle.dump(spec, fh, protocol=protocol)
        else:
            fbank = np.random.default_rng(k).normal(-4, 5, size=spec_shape).astype(np.float32)
            np.save(root / "audio_spec" / f"{vid}.npy", fbank)
        for t in range(1, n_frames + 1):
            write_jpeg(root / "visual" / vid / f"frame_0000{t}.jpg", 20 * t)
    return root


def write_image_folder(root: Path, classes=("cat", "bird"), per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        for k in range(per_class):
            write_png(root / name / f"img{k}.png", (50 * c + 10 * k, 100, 200))
    (root / "README.txt").write_text("ignored\n")
    return root


def write_wav_folder(root: Path, classes=("yes", "no"), per_class: int = 2,
                     rates: Sequence[int] = (16000,), seconds: float = 0.5) -> Path:
    n = 0
    for name in classes:
        for k in range(per_class):
            write_wav(root / name / f"clip{k}.wav", seconds, rates[n % len(rates)], seed=n)
            n += 1
    return root


# -- malicious pickles ----------------------------------------------------------------------------

class _Payload:
    """Unpickling this would call os.system("touch SENTINEL")."""

    def __init__(self, sentinel: Path):
        self.command = f"touch {sentinel}"

    def __reduce__(self):
        return (os.system, (self.command,))


class _ExecPayload:
    def __init__(self, sentinel: Path):
        self.code = f"open({str(sentinel)!r}, 'w').close()"

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


def write_malicious_pkl(path: Path, sentinel: Path, kind: str = "system") -> Path:
    """A pickle whose payload would create ``sentinel``. kind: system, exec, in-array, codec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "system":
        data = pickle.dumps(_Payload(sentinel), protocol=2)
    elif kind == "exec":
        data = pickle.dumps(_ExecPayload(sentinel), protocol=4)
    elif kind == "in-array":
        # a legitimate-looking object array whose element is the payload
        arr = np.empty(1, dtype=object)
        arr[0] = _Payload(sentinel)
        data = pickle.dumps(arr, protocol=2)
    elif kind == "codec":
        # _codecs.encode is admitted for latin-1 only; a zlib codec would be a decompression path
        data = (b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x04\x00\x00\x00"
                b"zlibq\x02\x86q\x03Rq\x04.")
    else:
        raise ValueError(kind)
    path.write_bytes(data)
    return path


# -- factory datasets (``data_fixtures:tuple_dataset`` etc.) --------------------------------------

class _TupleDS(torch.utils.data.Dataset):
    classes = ["low", "high"]

    def __init__(self, n: int = 6):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        audio = np.full((1, 8, 5), float(i), dtype=np.float64)          # (1, F, T): squeezed
        visual = torch.full((3, 4, 4), float(i))                          # (3, H, W): T = 1
        return audio, visual, torch.tensor(i % 2)


class _DictDS(torch.utils.data.Dataset):
    def __init__(self, split: str):
        self.split = split
        self.num_classes = 3

    def __len__(self) -> int:
        return 4 if self.split == "train" else 2

    def __getitem__(self, i: int):
        return {"video": torch.zeros(3, 2, 4, 4) + i, "target": i % 3, "extra": "ignored"}


def tuple_dataset():
    return _TupleDS()


def dict_dataset(split: str = "train"):
    return _DictDS(split)


def bad_item_dataset():
    class _Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return "not an item"

    return _Bad()


not_callable = 42


# -- the research codebases' own layouts (tests/test_data_layouts.py) -----------------------------

def write_vggsound_ogm(root: Path, rows=VGGSOUND_ROWS, rate: int = 16000, seconds: float = 3.0, frames: int = 4,
                       audio: str = "wav", mp4: bool = True, skip_files: Sequence[str] = ()) -> Path:
    """VGGSound as OGM-GE's VGGSoundDataset reads it (``audio="npy", mp4=False``: BalanceBenchmark's files):
    vggsound.csv at ROOT, {split}-audios/{split}-set/{id}_{start}.wav|.npy,
    {split}-videos/{split}-set-img/Image-01-FPS/{id}_{start}[.mp4]/frame_k.jpg. The clips of the rows
    ``{id}_{start}`` in ``skip_files`` get no files. Same tones and frames as :func:`write_vggsound`."""
    write_rows(root / "vggsound.csv", rows)
    for k, (vid, start, _, split) in enumerate(rows):
        clip = f"{vid}_{start}"
        if clip in skip_files:
            continue
        audio_dir = root / f"{split}-audios" / f"{split}-set"
        if audio == "wav":
            write_wav(audio_dir / f"{clip}.wav", seconds, rate, freq=300 + 40 * k, seed=k)
        else:
            audio_dir.mkdir(parents=True, exist_ok=True)
            np.save(audio_dir / f"{clip}.npy", np.random.default_rng(k).normal(size=(257, 30)).astype(np.float32))
        folder = root / f"{split}-videos" / f"{split}-set-img" / "Image-01-FPS" / (clip + (".mp4" if mp4 else ""))
        for f in range(1, frames + 1):
            write_jpeg(folder / f"frame_{f}.jpg", 30 * f)
    return root


def write_cremad_pt(root: Path, train=CREMAD_TRAIN, test=CREMAD_TEST, frames: int = 2,
                    shape: tuple[int, int] = (40, 16)) -> Path:
    """CREMA-D as MMPareto / Diagnosing & Re-learning / BalanceBenchmark keep it: train.csv, test.csv,
    audio/{clip}.pt (a precomputed fbank tensor, clip k filled from seed k), visual/{clip}/frame_000NN.jpg."""
    write_rows(root / "train.csv", train)
    write_rows(root / "test.csv", test)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for k, (clip, _) in enumerate(list(train) + list(test)):
        fbank = torch.from_numpy(np.random.default_rng(k).normal(size=shape).astype(np.float32))
        torch.save(fbank, root / "audio" / f"{clip}.pt")
        for f in range(1, frames + 1):
            write_jpeg(root / "visual" / clip / f"frame_000{f:02d}.jpg", 40 * f)
    return root


def write_ks_spaced(root: Path, train=KS_TRAIN, test=KS_TEST, n_frames: int = 8,
                    shape: tuple[int, int] = (257, 24)) -> Path:
    """Kinetics-Sounds as BalanceBenchmark reads it: my_train.txt / my_test.txt rows ``name label``
    separated by spaces (label last), audio/{name}.npy, visual/{name}/frame_0000{t}.jpg (grey 20 * t)."""
    for name, rows in (("my_train.txt", train), ("my_test.txt", test)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(f"{vid} {label}\n" for vid, label in rows))
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for k, (vid, _) in enumerate(list(train) + list(test)):
        np.save(root / "audio" / f"{vid}.npy", np.random.default_rng(k).normal(size=shape).astype(np.float32))
        for t in range(1, n_frames + 1):
            write_jpeg(root / "visual" / vid / f"frame_0000{t}.jpg", 20 * t)
    return root


AVE_CLASSES = ("Church bell", "Dog", "Acoustic guitar")
AVE_TRAIN = [("Dog", "aveA"), ("Church bell", "aveB"), ("Acoustic guitar", "aveC"), ("Dog", "aveD")]
AVE_TEST = [("Dog", "aveE"), ("Church bell", "aveF")]


def write_ave_ogm(root: Path, train=AVE_TRAIN, test=AVE_TEST, n_frames: int = 6) -> Path:
    """AVE as OGM-GE's AVDataset reads it: stat.txt (class names), my_train.txt / my_test.txt rows
    ``Category,id,good,0,10``, audio_spec/{id}.pkl, visual/{id}/frame_0000{t}.jpg."""
    write_rows(root / "stat.txt", [(c,) for c in AVE_CLASSES])
    write_rows(root / "my_train.txt", [(c, vid, "good", 0, 10) for c, vid in train])
    write_rows(root / "my_test.txt", [(c, vid, "good", 0, 10) for c, vid in test])
    (root / "audio_spec").mkdir(parents=True, exist_ok=True)
    for k, (_, vid) in enumerate(list(train) + list(test)):
        with open(root / "audio_spec" / f"{vid}.pkl", "wb") as fh:
            pickle.dump(np.random.default_rng(k).normal(size=(257, 20)), fh, protocol=4)
        for t in range(1, n_frames + 1):
            write_jpeg(root / "visual" / vid / f"frame_0000{t}.jpg", 20 * t)
    return root


def truncate_file(path: Path, keep: int = 100) -> Path:
    """Keep the first ``keep`` bytes (a wav cut this short still has its header, which claims more data)."""
    path.write_bytes(path.read_bytes()[:keep])
    return path


def keep_frames(folder: Path, n: int) -> Path:
    """Delete every image of a frame folder after the first ``n`` (in name order)."""
    for p in sorted(folder.iterdir())[n:]:
        p.unlink()
    return folder


def write_malicious_pt(path: Path, sentinel: Path) -> Path:
    """A torch.save file whose pickle, if ever loaded without weights_only, would create ``sentinel``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fbank": _Payload(sentinel)}, path)
    return path

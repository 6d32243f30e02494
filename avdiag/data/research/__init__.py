"""The research datasets as the OGM-GE family lays them out: CREMA-D, VGGSound, Kinetics-Sounds, AVE.

Spec: ``NAME:ROOT`` or ``NAME:ROOT,audio=DIR,frames=DIR,list=FILE`` (the options in any order, each
optional). ``DIR``/``FILE`` relative to ROOT unless absolute; ``{split}`` in them becomes ``train`` or
``test`` (e.g. ``audio=/data/vgg/{split}-audios/{split}-set``). Without them the layout is detected:
every candidate below is tried on the first listed rows of the split, and the one whose files are
there (audio file and frame folder) wins; the file extension (``.wav``/``.pt``/``.npy``/``.pkl``)
and the frame-folder suffix (``.mp4`` or none) are detected the same way. ``report()["layout"]``
says which was used.

* ``cremad``: ``train.csv`` / ``test.csv``, rows ``clip,label`` (no header; a UTF-8 BOM is fine).
  Audio ``AudioWAV/{clip}.wav`` (OGM-GE) or ``audio/{clip}.wav|.pt`` (MMPareto, Diagnosing &
  Re-learning, BalanceBenchmark: ``.pt`` holds a precomputed fbank/spectrogram tensor, read with
  ``torch.load(weights_only=True)`` and returned as stored, float32). A wav is read at 22.05 kHz,
  tiled to 3 s, clipped to [-1, 1], STFT n_fft 512 hop 353, ``log(|S| + 1e-7)`` -> (257, 188).
  (OGM-GE repeats the clip exactly 3 times and cuts at 3 s: the same for every clip of 1 s or more,
  i.e. all of CREMA-D; a shorter clip is repeated further here so that every item has the same
  shape.) Frames ``Image-01-FPS/{clip}/`` or ``visual/{clip}/``, 1 frame, 224 px, ImageNet
  normalisation -> (3, 1, 224, 224). Class order ``ogm`` (default: NEU, HAP, SAD, FEA, DIS, ANG, as
  in OGM-GE and BalanceBenchmark) or ``alphabetical`` (ANG, DIS, FEA, HAP, NEU, SAD: MMPareto,
  Diagnosing & Re-learning). A row is kept when its audio file and frame folder exist and the
  folder holds at least ``frames`` images (BalanceBenchmark's rule). Note: the CREMA-D release ships
  16 kHz wavs; OGM-GE's ``librosa.load(sr=22050)`` resamples them on load. avdiag refuses a rate
  other than the expected one unless resampling is asked for (``DataOptions(resample=True)``).
* ``vggsound``: ``vggsound.csv``, rows ``youtube_id,start_seconds,label,train|test`` (no header).
  Files, flat: ``audio/{id}_{start}.wav`` and ``Image-01-FPS/{id}_{start}.mp4/``; as OGM-GE's
  ``VGGSoundDataset`` reads them: ``train-audios/train-set/{id}_{start}.wav`` (``test-audios/test-set``)
  and ``train-videos/train-set-img/Image-01-FPS/{id}_{start}.mp4/`` (``test-videos/test-set-img``);
  either with ``.npy`` audio (a precomputed spectrogram, returned as stored: BalanceBenchmark) and
  frame folders without ``.mp4``. A row is kept when its audio file and frame folder exist and the
  folder holds more than 3 images (and at least ``frames``), as the reference loaders decide. Class
  index = order of first appearance of the label among the kept train rows, as OGM-GE builds it
  (among all listed train rows when no train folder is on disk; ``class_order`` ``alphabetical``
  sorts instead); a test row whose label has no kept train row is
  skipped. A wav is read at 16 kHz, doubled (``np.tile(x, 2)``) until it lasts >= 10 s, then a 5 s
  crop is taken, clipped to [-1, 1], STFT 256/128 -> (129, 626), 3 frames. The crop starts at
  ``audio_start`` seconds (default 2.5 s: the training code draws the start uniformly from [0, 5 s],
  2.5 s is the middle of that range, i.e. the centre crop of a 10 s clip); a start past the doubled
  clip repeats it further.
* ``ks`` (Kinetics-Sounds, 31 classes) and ``ave`` (28 classes): ``my_train.txt`` / ``my_test.txt``.
  OGM-GE form: rows ``id,10,label_idx`` (class names are the indices); audio
  ``audio_spec/{id}.pkl`` (a pickled numpy spectrogram, read with :mod:`avdiag.data.safe_pickle`;
  returned as stored, float32) or Kaldi-style fbank ``audio_spec/{id}.npy`` (read with
  ``allow_pickle=False``; zero-padded or cut to 1024 frames, then ``(x + 4.503877) / (2 * 5.141276)``;
  kept in its stored (1024, 128) orientation); frames ``visual/{id}/frame_0000{t}.jpg`` with
  ``t = seg * i + 1``, ``seg = n // 3`` for the n images in the folder (the test-time choice of the
  reference code); a folder with fewer than ``frames`` images is skipped. AVE as OGM-GE reads it:
  rows ``Category,id,...`` with ``stat.txt`` (one class name per row) next to the lists; classes
  are the sorted names; an id listed more than once is skipped (OGM-GE drops an id listed twice).
  BalanceBenchmark form (a list whose rows have no comma): ``name ... label`` separated by spaces,
  the label last; audio ``{name}.npy`` returned as stored; a folder needs more than 3 images; frame
  ``t = i * seg + max(seg // 2, 1)`` (``t = 1`` for all when the folder holds 6 images or fewer),
  BalanceBenchmark's test-time choice. Audio folders tried: ``audio_spec/``, ``audio/``,
  ``{split}_spec/``; frame folders: ``visual/``, ``frames/``.

Rows whose files are missing, whose frame folder has too few images, or whose wav file is empty,
truncated or not a wav (its chunk headers are read when the dataset is opened) are skipped, as the
reference loaders skip them, but never silently: each goes to the dataset's skip log with its list
row, clip and reason (``report()``). A file that turns out undecodable when the item is read (a
corrupt image, an unreadable tensor file) is skipped then, before any number is computed from it.
With ``DataOptions(strict=True)`` every such row is the one-line error instead. Nothing usable left
in a split is an error. Deterministic choices for diagnostics (the training code randomises them):
frames in natural file-name order at segment starts (:mod:`avdiag.data.images`), test-time resize
to 224 x 224 (bilinear), no flips or crops.

One module per family on a shared base: :mod:`~avdiag.data.research.cremad`,
:mod:`~avdiag.data.research.vggsound`, :mod:`~avdiag.data.research.kinetics` (Kinetics-Sounds and
AVE); :mod:`~avdiag.data.research.base` holds the spec, layout detection and row skipping.
"""

from __future__ import annotations

from pathlib import Path

from avdiag.data.base import DataOptions
from avdiag.data.research.base import Layout, ResearchDataset, ResearchSpec, parse_research_spec
from avdiag.data.research.cremad import CREMAD_OGM_ORDER, CremaD
from avdiag.data.research.kinetics import AVE, KineticsSounds
from avdiag.data.research.vggsound import VGGSound

RESEARCH_NAMES = ("cremad", "vggsound", "ks", "ave")


RESEARCH_CLASSES: dict[str, type[ResearchDataset]] = {
    "cremad": CremaD, "vggsound": VGGSound, "ks": KineticsSounds, "ave": AVE,
}


def open_research(name: str, root: Path | str | ResearchSpec, split: str, options: DataOptions,
                  spec: str | None = None) -> ResearchDataset:
    """``root``: a folder, a :class:`ResearchSpec`, or the text after ``NAME:`` (options included)."""
    if isinstance(root, str):
        root = parse_research_spec(name, root)
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


__all__ = ["RESEARCH_NAMES", "CREMAD_OGM_ORDER", "ResearchDataset", "ResearchSpec", "Layout", "CremaD",
           "VGGSound", "KineticsSounds", "AVE", "open_research", "parse_research_spec", "expected_shapes"]

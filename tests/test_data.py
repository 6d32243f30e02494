"""Datasets: research layouts, tensor files, folders, synthetic, factories, loaders, AV digits."""

from __future__ import annotations

import json
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import wavfile
from scipy.signal import get_window

from avdiag.data import (
    AVDataset, DataError, DataOptions, build_avdigits, collate, make_loader, open_dataset,
    save_tensor_file,
)
from avdiag.data.base import IMAGENET_MEAN, IMAGENET_STD
from avdiag.data.safe_pickle import load_array, loads_array
from avdiag.errors import AvdiagError
from data_fixtures import (
    KS_TEST, KS_TRAIN, write_corrupt_jpeg, write_cremad, write_image_folder, write_ks,
    write_malicious_pkl, write_rows, write_vggsound, write_wav, write_wav_folder,
)

STRICT = DataOptions(strict=True)


def reference_log_stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """librosa.stft(center=True, pad_mode='reflect', window='hann') + log(|S| + 1e-7), in numpy."""
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    n = 1 + (padded.size - n_fft) // hop
    frames = np.stack([padded[k * hop: k * hop + n_fft] for k in range(n)], axis=1)
    spec = np.fft.rfft(frames * get_window("hann", n_fft)[:, None], axis=0)
    return np.log(np.abs(spec) + 1e-7)


def normalised(grey: int) -> torch.Tensor:
    return (grey / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# -- CREMA-D --------------------------------------------------------------------------------------

def test_cremad_shapes_labels_and_exact_preprocessing(tmp_path):
    root = write_cremad(tmp_path / "crema")
    ds = open_dataset(f"cremad:{root}")
    assert isinstance(ds, AVDataset) and ds.name == "cremad" and ds.split == "train"
    assert ds.classes == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert ds.modalities == ("audio", "visual") and len(ds) == 3
    assert [ds[i]["label"] for i in range(3)] == [5, 1, 0]           # ANG, HAP, NEU
    item = ds[2]
    assert set(item) == {"audio", "visual", "label", "index"} and item["index"] == 2
    assert item["audio"].shape == (257, 188) and item["audio"].dtype == torch.float32
    assert item["visual"].shape == (3, 1, 224, 224)
    # the audio: 1.3 s at 22.05 kHz tiled to 3 s, STFT 512/353, log(|S| + 1e-7)
    _, pcm = wavfile.read(root / "AudioWAV" / "1088_IOM_NEU_XX.wav")
    x = np.tile(pcm.astype(np.float32) / 32768.0, 3)[: 22050 * 3]
    np.testing.assert_allclose(item["audio"].numpy(), reference_log_stft(x, 512, 353), atol=2e-3)
    # the frame: the first of the folder (grey 40), ImageNet-normalised
    means = item["visual"].mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, normalised(40), atol=0.03, rtol=0)
    test = open_dataset(f"cremad:{root}", split="test")
    assert [test[i]["label"] for i in range(3)] == [2, 4, 3]         # SAD, DIS, FEA


def test_cremad_alphabetical_order(tmp_path):
    root = write_cremad(tmp_path / "crema")
    ds = open_dataset(f"cremad:{root}", options=DataOptions(class_order="alphabetical"))
    assert ds.classes == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert [ds[i]["label"] for i in range(3)] == [0, 3, 4]
    with pytest.raises(DataError, match="unknown class order 'sorted'"):
        open_dataset(f"cremad:{root}", options=DataOptions(class_order="sorted"))


def test_cremad_missing_file_names_expected_path_and_row(tmp_path):
    root = write_cremad(tmp_path / "crema")
    (root / "AudioWAV" / "1088_IOM_NEU_XX.wav").unlink()
    ds = open_dataset(f"cremad:{root}")          # the row is skipped and reported, not silently dropped
    assert len(ds) == 2
    assert ds.report()["skipped"]["rows"] == [{"split": "train", "row": 3, "clip": "1088_IOM_NEU_XX", "kind": "missing",
                                                "reason": f"expected {root}/AudioWAV/1088_IOM_NEU_XX.wav"}]
    with pytest.raises(DataError) as exc:
        open_dataset(f"cremad:{root}", options=STRICT)
    assert one_line(exc) == (f"cremad:{root}: expected {root}/AudioWAV/1088_IOM_NEU_XX.wav "
                             "(listed in train.csv row 3)")
    shutil.rmtree(root / "Image-01-FPS" / "1001_DFA_ANG_XX")
    with pytest.raises(DataError, match=r"expected frame folder .*1001_DFA_ANG_XX/ \(listed in "
                                        r"train.csv row 1\)"):
        open_dataset(f"cremad:{root}", options=STRICT)
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match=f"expected list file {root}/test.csv"):
        open_dataset(f"cremad:{root}", split="test")
def test_cremad_wrong_sample_rate_is_refused_unless_resampling(tmp_path):
    root = write_cremad(tmp_path / "crema", rate=16000)
    with pytest.raises(DataError) as exc:
        open_dataset(f"cremad:{root}")
    msg = one_line(exc)
    assert "1001_DFA_ANG_XX.wav" in msg and "16000 Hz" in msg and "22050 Hz" in msg
    ds = open_dataset(f"cremad:{root}", options=DataOptions(resample=True))
    assert ds[0]["audio"].shape == (257, 188)


def test_cremad_corrupt_jpeg_and_malformed_rows(tmp_path):
    root = write_cremad(tmp_path / "crema")
    bad = root / "Image-01-FPS" / "1002_IEO_HAP_HI" / "00001.jpg"
    write_corrupt_jpeg(bad)
    ds = open_dataset(f"cremad:{root}")
    with pytest.raises(DataError) as exc:
        ds[1]
    msg = one_line(exc)
    assert f"corrupt or unreadable image {bad}" in msg and msg.endswith(" (listed in train.csv row 2)"), msg
    write_rows(root / "train.csv", [("1001_DFA_ANG_XX", "ANG"), ("1002_IEO_HAP_HI",)])
    with pytest.raises(DataError, match=r"malformed row 2 in .*train.csv: expected clip,label"):
        open_dataset(f"cremad:{root}")
    write_rows(root / "train.csv", [("1001_DFA_ANG_XX", "ANGRY")])
    with pytest.raises(DataError, match="unknown label 'ANGRY' in row 1"):
        open_dataset(f"cremad:{root}")


# -- VGGSound -------------------------------------------------------------------------------------

def test_vggsound_first_appearance_order_shapes_and_crop(tmp_path):
    root = write_vggsound(tmp_path / "vgg")
    ds = open_dataset(f"vggsound:{root}")
    assert ds.classes == ["cat meowing", "dog barking", "playing guitar, slide"]
    assert len(ds) == 3 and [ds[i]["label"] for i in range(3)] == [0, 1, 2]
    item = ds[0]
    assert item["audio"].shape == (129, 626) and item["visual"].shape == (3, 3, 224, 224)
    # audio/vidB_30.wav: 3 s doubled to 12 s, the 5 s starting at 2.5 s, STFT 256/128
    _, pcm = wavfile.read(root / "audio" / "vidB_30.wav")
    x = np.tile(pcm.astype(np.float32) / 32768.0, 4)[40000:120000]
    np.testing.assert_allclose(item["audio"].numpy(), reference_log_stft(x, 256, 128), atol=2e-3)
    # 4 frames, 3 wanted: segment starts 0, 1, 2 -> frame_1, frame_2, frame_3 (grey 30, 60, 90)
    for t, grey in enumerate((30, 60, 90)):
        torch.testing.assert_close(item["visual"][:, t].mean(dim=(1, 2)), normalised(grey),
                                   atol=0.03, rtol=0)
    test = open_dataset(f"vggsound:{root}", split="test")
    assert [test[i]["label"] for i in range(3)] == [1, 0, 2]
    alpha = open_dataset(f"vggsound:{root}", options=DataOptions(class_order="alphabetical"))
    assert alpha.classes == sorted(ds.classes)


def test_vggsound_errors(tmp_path):
    root = write_vggsound(tmp_path / "vgg")
    (root / "audio" / "vidC_10.wav").unlink()
    with pytest.raises(DataError) as exc:
        open_dataset(f"vggsound:{root}", options=STRICT)
    assert one_line(exc) == (f"vggsound:{root}: expected {root}/audio/vidC_10.wav "
                             "(listed in vggsound.csv row 3)")
    write_rows(root / "vggsound.csv", [("vidB", "30", "cat meowing", "train"),
                                       ("vidC", "10", "dog barking", "val")])
    with pytest.raises(DataError, match=r"malformed row 2 in .*vggsound.csv: split must be train or test"):
        open_dataset(f"vggsound:{root}")
    write_rows(root / "vggsound.csv", [("vidB", "30", "cat meowing", "train"),
                                       ("vidA", "0", "dog", "test")])
    with pytest.raises(DataError, match="label 'dog' in test row 2 .* never appears in a train row"):
        open_dataset(f"vggsound:{root}", split="test")


# -- Kinetics-Sounds and AVE ----------------------------------------------------------------------

def test_ks_pickled_spectrograms_and_evenly_spaced_frames(tmp_path):
    root = write_ks(tmp_path / "ks")
    ds = open_dataset(f"ks:{root}")
    assert ds.classes == [str(k) for k in range(31)]
    assert [ds[i]["label"] for i in range(3)] == [lab for _, lab in KS_TRAIN]
    item = ds[1]
    expected = np.random.default_rng(1).normal(size=(257, 20)).astype(np.float32)
    np.testing.assert_array_equal(item["audio"].numpy(), expected)
    assert item["visual"].shape == (3, 3, 224, 224)
    # 10 frames: seg = 3, frames t = 1, 4, 7 at grey 20 * t
    for t, grey in enumerate((20, 80, 140)):
        torch.testing.assert_close(item["visual"][:, t].mean(dim=(1, 2)), normalised(grey),
                                   atol=0.03, rtol=0)
    test = open_dataset(f"ks:{root}", split="test")
    assert [test[i]["label"] for i in range(2)] == [lab for _, lab in KS_TEST]


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_safe_pickle_reads_numpy_arrays_of_every_protocol(protocol):
    for arr in (np.arange(12, dtype=np.int16).reshape(3, 4), np.linspace(0, 1, 6), np.array(3.5)):
        out = loads_array(pickle.dumps(arr, protocol=protocol))
        np.testing.assert_array_equal(out, arr)
        assert out.dtype == arr.dtype


def test_ks_fbank_npy_is_padded_and_normalised(tmp_path):
    root = write_ks(tmp_path / "ks", audio="npy", spec_shape=(1000, 128))
    ds = open_dataset(f"ks:{root}")
    item = ds[0]
    raw = np.load(root / "audio_spec" / f"{KS_TRAIN[0][0]}.npy")
    assert item["audio"].shape == (1024, 128)
    np.testing.assert_allclose(item["audio"][:1000].numpy(), (raw + 4.503877) / (2 * 5.141276), rtol=1e-6)
    np.testing.assert_allclose(item["audio"][1000:].numpy(), 4.503877 / (2 * 5.141276), rtol=1e-6)


def test_ave_has_28_classes_and_checks_label_range(tmp_path):
    root = write_ks(tmp_path / "ave", train=[("vid1", 27), ("vid2", 3)], test=[("vid3", 0)])
    ds = open_dataset(f"ave:{root}")
    assert len(ds.classes) == 28 and [ds[i]["label"] for i in range(2)] == [27, 3]
    write_rows(root / "my_train.txt", [("vid1", 10, 28)])
    with pytest.raises(DataError, match=r"malformed row 1 .*label_idx must be an integer in 0..27"):
        open_dataset(f"ave:{root}")


def test_ave_category_lists_with_stat_file(tmp_path):
    root = write_ks(tmp_path / "ave", train=[("vid1", 0), ("vid2", 0)], test=[("vid3", 0)])
    write_rows(root / "stat.txt", [("Church bell",), ("Acoustic guitar",), ("Dog",)])
    write_rows(root / "my_train.txt", [("Dog", "vid1", "good", 0, 10),
                                       ("Church bell", "vid2", "good", 0, 10)])
    ds = open_dataset(f"ave:{root}")
    assert ds.classes == ["Acoustic guitar", "Church bell", "Dog"]
    assert [ds[i]["label"] for i in range(2)] == [2, 1]


@pytest.mark.parametrize("kind", ["system", "exec", "in-array", "codec"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, kind):
    root = write_ks(tmp_path / "ks")
    sentinel = tmp_path / "PWNED"
    target = root / "audio_spec" / f"{KS_TRAIN[1][0]}.pkl"
    write_malicious_pkl(target, sentinel, kind)
    ds = open_dataset(f"ks:{root}")
    with pytest.raises(DataError) as exc:
        ds[1]
    msg = one_line(exc)
    assert msg.startswith(f"ks:{root}: refused global ") and str(target) in msg
    assert msg.endswith(" (the file was not executed) (listed in my_train.txt row 2)"), msg
    expected = {"system": "posix.system", "exec": "builtins.exec", "in-array": "posix.system",
                "codec": "_codecs.encode (codec 'zlib')"}[kind]
    assert f"refused global {expected} in" in msg
    assert not sentinel.exists()
    # and directly, as the first item: refused at open time
    write_malicious_pkl(root / "audio_spec" / f"{KS_TRAIN[0][0]}.pkl", sentinel, kind)
    with pytest.raises(DataError, match="refused global"):
        open_dataset(f"ks:{root}")
    assert not sentinel.exists()


def test_safe_pickle_refuses_non_arrays_and_other_numpy_globals(tmp_path):
    with pytest.raises(DataError, match="holds a dict, expected a numpy array"):
        loads_array(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match="refused global numpy.load"):
        loads_array(b"\x80\x02cnumpy\nload\nq\x00X\x01\x00\x00\x00xq\x01\x85q\x02Rq\x03.")
    with pytest.raises(DataError, match="holds a object array"):
        loads_array(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(DataError, match="unreadable pickle"):
        loads_array(b"\x80\x04garbage")
    with pytest.raises(DataError, match="expected .*missing.pkl"):
        load_array(tmp_path / "missing.pkl")


# -- $AVDIAG_DATA and spec resolution -------------------------------------------------------------

def test_bare_name_resolves_under_avdiag_data(tmp_path, monkeypatch):
    write_cremad(tmp_path / "data" / "cremad")
    monkeypatch.setenv("AVDIAG_DATA", str(tmp_path / "data"))
    ds = open_dataset("cremad")
    assert len(ds) == 3 and ds.spec == "cremad"
    with pytest.raises(DataError) as exc:
        open_dataset("vggsound")
    assert one_line(exc) == f"vggsound: expected $AVDIAG_DATA/vggsound at {tmp_path / 'data' / 'vggsound'}"
    monkeypatch.delenv("AVDIAG_DATA")
    with pytest.raises(DataError, match=r"\$AVDIAG_DATA is not set"):
        open_dataset("ks")


def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nonsense'"):
        open_dataset("nonsense")
    with pytest.raises(DataError, match="unknown split 'val'"):
        open_dataset("synthetic", split="val")
    with pytest.raises(DataError, match="expected a dataset folder at"):
        open_dataset(f"cremad:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="expected tensor file"):
        open_dataset(str(tmp_path / "x.npz"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="cannot read as a dataset"):
        open_dataset(str(tmp_path / "notes.txt"))
    assert issubclass(DataError, AvdiagError) and DataError.exit_code == 2


# -- tensor files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_tensor_files(tmp_path, suffix):
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(5, 1, 16, 10))
    visual = rng.normal(size=(5, 3, 8, 8))
    labels = [0, 2, 1, 2, 0]
    path = save_tensor_file(tmp_path / f"d{suffix}", labels, audio=audio, visual=visual,
                            classes=["a", "b", "c"])
    ds = open_dataset(str(path))
    assert ds.classes == ["a", "b", "c"] and ds.modalities == ("audio", "visual") and len(ds) == 5
    item = ds[3]
    assert item["label"] == 2 and item["audio"].shape == (16, 10) and item["visual"].shape == (3, 1, 8, 8)
    np.testing.assert_allclose(item["audio"].numpy(), audio[3, 0], rtol=1e-6)
    only_audio = save_tensor_file(tmp_path / f"a{suffix}", labels, audio=audio[:, 0])
    ds = open_dataset(str(only_audio))
    assert ds.modalities == ("audio",) and ds.classes == ["0", "1", "2"] and "visual" not in ds[0]


def test_tensor_file_errors(tmp_path):
    np.savez(tmp_path / "typo.npz", audoi=np.zeros((2, 3, 4)), labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="unexpected array 'audoi'"):
        open_dataset(str(tmp_path / "typo.npz"))
    np.savez(tmp_path / "obj.npz", audio=np.array([None, 1], dtype=object), labels=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="object arrays"):
        open_dataset(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "n.npz", audio=np.zeros((3, 4, 4)), labels=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="'audio' has 3 items, 'labels' has 2"):
        open_dataset(str(tmp_path / "n.npz"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DataError, match="unreadable .safetensors"):
        open_dataset(str(tmp_path / "bad.safetensors"))


# -- folders --------------------------------------------------------------------------------------

def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("cat", "bird"))
    ds = open_dataset(str(root), options=DataOptions(image_size=64, mean=(0, 0, 0), std=(1, 1, 1)))
    assert ds.classes == ["bird", "cat"] and ds.modalities == ("visual",) and len(ds) == 4
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    item = ds[2]                                        # cat/img0.png: colour (0, 100, 200)
    assert item["visual"].shape == (3, 1, 64, 64) and "audio" not in item
    torch.testing.assert_close(item["visual"].mean(dim=(1, 2, 3)),
                               torch.tensor([0, 100, 200]) / 255.0, atol=1e-3, rtol=0)


def test_wav_folder_resamples_and_uses_stft_options(tmp_path):
    root = write_wav_folder(tmp_path / "wavs", rates=(16000, 8000), seconds=0.5)
    ds = open_dataset(str(root), options=DataOptions(n_fft=128, hop=64))
    assert ds.classes == ["no", "yes"] and ds.modalities == ("audio",)
    assert {tuple(ds[i]["audio"].shape) for i in range(4)} == {(65, 1 + 8000 // 64)}
    ds = open_dataset(str(root), options=DataOptions(sample_rate=8000, seconds=1.0))
    assert ds[0]["audio"].shape == (257, 1 + 8000 // 160)


def test_folder_splits_and_errors(tmp_path):
    write_image_folder(tmp_path / "sp" / "train", classes=("a", "b"))
    write_image_folder(tmp_path / "sp" / "test", classes=("a", "b"), per_class=1)
    assert len(open_dataset(str(tmp_path / "sp"), split="test")) == 2
    mixed = write_image_folder(tmp_path / "mixed")
    write_wav(mixed / "cat" / "x.wav", 0.1, 8000)
    with pytest.raises(DataError, match="holds both images"):
        open_dataset(str(mixed))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders with images or wav files"):
        open_dataset(str(tmp_path / "empty"))


# -- synthetic ------------------------------------------------------------------------------------

SPEC = "synthetic:n=256,classes=6,audio=0.9,visual=0.2,seed=0"


def test_synthetic_is_deterministic():
    a, b = open_dataset(SPEC), open_dataset(SPEC)
    assert a.classes == [f"class{c}" for c in range(6)] and len(a) == 256
    for i in (0, 17, 255):
        torch.testing.assert_close(a[i]["audio"], b[i]["audio"], rtol=0, atol=0)
        torch.testing.assert_close(a[i]["visual"], b[i]["visual"], rtol=0, atol=0)
        assert a[i]["label"] == b[i]["label"]
    other = open_dataset(SPEC.replace("seed=0", "seed=1"))
    assert not torch.equal(a[0]["audio"], other[0]["audio"])
    test = open_dataset(SPEC, split="test")
    assert not torch.equal(a[0]["audio"], test[0]["audio"])
    item = open_dataset("synthetic:n=4,f=20,t=10,size=16,frames=2,visual=off")[0]
    assert item["audio"].shape == (20, 10) and "visual" not in item
    with pytest.raises(DataError, match="unknown key 'nclasses'"):
        open_dataset("synthetic:nclasses=3")
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        open_dataset("synthetic:audio=1.5")


def _nearest_centroid_accuracy(modality: str) -> float:
    train = collate(list(open_dataset(SPEC)))
    test = collate(list(open_dataset(SPEC, split="test")))
    x = train[modality].flatten(1)
    centroids = torch.stack([x[train["label"] == c].mean(0) for c in range(6)])
    pred = torch.cdist(test[modality].flatten(1), centroids).argmin(1)
    return (pred == test["label"]).float().mean().item()


def test_synthetic_informativeness_sets_per_modality_accuracy():
    audio, visual = _nearest_centroid_accuracy("audio"), _nearest_centroid_accuracy("visual")
    # ceilings: 0.9 + 0.1 / 6 = 0.92 and 0.2 + 0.8 / 6 = 0.33
    assert audio > 0.8 and visual < 0.45 and audio - visual > 0.4


# -- factories ------------------------------------------------------------------------------------

def test_factory_datasets_are_adapted():
    ds = open_dataset("data_fixtures:tuple_dataset")
    assert ds.classes == ["low", "high"] and ds.modalities == ("audio", "visual") and len(ds) == 6
    item = ds[3]
    assert item["audio"].shape == (8, 5) and item["audio"].dtype == torch.float32
    assert item["visual"].shape == (3, 1, 4, 4) and item["label"] == 1 and item["index"] == 3
    ds = open_dataset("data_fixtures:dict_dataset", split="test")
    assert len(ds) == 2 and ds.modalities == ("visual",) and ds.classes == ["0", "1", "2"]
    assert ds[1]["visual"].shape == (3, 2, 4, 4) and ds[1]["label"] == 1
    with pytest.raises(DataError, match="items must be dicts"):
        open_dataset("data_fixtures:bad_item_dataset")
    with pytest.raises(DataError, match="has no callable 'not_callable'"):
        open_dataset("data_fixtures:not_callable")
    with pytest.raises(DataError, match="unknown dataset"):
        open_dataset("no_such_module_xyz:factory")


# -- collate and make_loader ----------------------------------------------------------------------

def test_make_loader_is_deterministic_and_limited():
    ds = open_dataset("synthetic:n=40,classes=3,f=8,t=6,size=8")
    def run(**kw):
        return [b for b in make_loader(ds, batch_size=8, **kw)]
    a, b = run(limit=20, seed=3), run(limit=20, seed=3)
    assert [len(x["label"]) for x in a] == [8, 8, 4]
    idx = torch.cat([x["index"] for x in a])
    assert torch.equal(idx, torch.cat([x["index"] for x in b])) and len(set(idx.tolist())) == 20
    assert not torch.equal(idx, torch.cat([x["index"] for x in run(limit=20, seed=4)]))
    first = a[0]
    assert first["audio"].shape == (8, 8, 6) and first["visual"].shape == (8, 3, 1, 8, 8)
    assert first["label"].dtype == torch.long
    assert torch.equal(torch.cat([x["index"] for x in run()]), torch.arange(40))
    assert sum(len(x["label"]) for x in run(limit=100)) == 40
    workers = run(limit=20, seed=3, num_workers=2)
    for x, y in zip(a, workers):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["audio"], y["audio"])
    with pytest.raises(DataError, match="limit must be a positive integer"):
        make_loader(ds, limit=0)


def test_worker_errors_stay_one_line(tmp_path):
    root = write_cremad(tmp_path / "crema")
    write_corrupt_jpeg(root / "Image-01-FPS" / "1088_IOM_NEU_XX" / "00001.jpg")
    ds = open_dataset(f"cremad:{root}", options=STRICT)
    with pytest.raises(DataError) as exc:
        list(make_loader(ds, batch_size=3, num_workers=1))
    msg = one_line(exc)
    assert "corrupt or unreadable image" in msg and msg.endswith("(listed in train.csv row 3)")
def test_collate_refuses_mixed_items():
    a = {"audio": torch.zeros(2, 3), "label": 0, "index": 0}
    b = {"visual": torch.zeros(3, 1, 2, 2), "label": 1, "index": 1}
    with pytest.raises(DataError, match="modalities"):
        collate([a, b])
    with pytest.raises(DataError, match="differ in shape"):
        collate([a, {"audio": torch.zeros(2, 4), "label": 0, "index": 1}])


# -- AV digits ------------------------------------------------------------------------------------

needs_tts = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("flite") is None,
                               reason="espeak-ng and flite are not installed "
                                      "(apt-get install espeak-ng flite)")


@pytest.mark.slow
@needs_tts
def test_avdigits_tiny_build(tmp_path):
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    out = build_avdigits(tmp_path / "avd", max_voices=3, seed=0)
    assert time.perf_counter() - t0 < 20
    manifest = json.loads((out / "avdigits.json").read_text())
    assert manifest["format"] == "avdigits" and manifest["clips"] == 30
    assert manifest["classes"] == [str(c) for c in range(10)] and manifest["sample_rate"] == 16000
    engines = {v["engine"] for v in manifest["voices"]}
    assert engines == {"espeak-ng", "flite"} and len(manifest["voices"]) == 3
    train_voices = set(manifest["splits"]["train"]["voices"])
    test_voices = set(manifest["splits"]["test"]["voices"])
    assert len(train_voices) == 2 and len(test_voices) == 1 and not train_voices & test_voices
    digits = load_digits()
    images = {}
    for split in ("train", "test"):
        rows = (out / f"{split}.csv").read_text().splitlines()
        assert rows[0] == "clip,label,voice,wav,image,digit_index" and len(rows) == 1 + 10 * (
            2 if split == "train" else 1)
        for line in rows[1:]:
            clip, label, voice, wav, image, digit_index = line.split(",")
            assert voice in (train_voices if split == "train" else test_voices)
            rate, pcm = wavfile.read(out / wav)
            assert rate == 16000 and pcm.shape == (16000,) and pcm.dtype == np.int16
            x = pcm.astype(np.float32) / 32768
            assert np.sqrt((x ** 2).mean()) > 0.02 and abs(x).max() > 0.4
            assert abs(x[:80]).max() < 0.01 and abs(x[-80:]).max() < 0.01       # centred, trimmed
            k = int(digit_index)
            assert digits.target[k] == int(label)
            images[k] = (split, out / image)
    split_of_image = {}
    for k, (split, path) in images.items():
        assert split_of_image.setdefault(k, split) == split                    # disjoint pools
        grey = np.round(digits.images[k] * (255 / 16)).astype(np.uint8)
        expected = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BILINEAR).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
    ds = open_dataset(f"avdigits:{out}")
    assert ds.classes == [str(c) for c in range(10)] and len(ds) == 20
    item = ds[0]
    assert item["audio"].shape == (129, 126) and item["visual"].shape == (3, 1, 32, 32)
    assert len(open_dataset(str(out), split="test")) == 10                       # folder auto-detect
    with pytest.raises(DataError, match="already exists and is not an empty folder"):
        build_avdigits(out, max_voices=2)


def test_avdigits_without_tools_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError) as exc:
        build_avdigits(tmp_path / "avd", max_voices=2)
    assert "apt-get install espeak-ng flite" in one_line(exc)
    assert not (tmp_path / "avd").exists()


def test_avdigits_open_errors(tmp_path):
    with pytest.raises(DataError, match="avdigits.json"):
        open_dataset(f"avdigits:{tmp_path}")
    (tmp_path / "avdigits.json").write_text(json.dumps({"format": "avdigits", "classes": ["0", "1"]}))
    (tmp_path / "train.csv").write_text("clip,label,voice,wav,image,digit_index\n"
                                        "c,0,v,wav/c.wav,images/1.png,1\n")
    with pytest.raises(DataError, match=r"expected .*wav/c.wav \(listed in train.csv row 2\)"):
        open_dataset(f"avdigits:{tmp_path}")


def test_image_folder_keeps_empty_class_folders_in_the_index(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "c"))
    (root / "b").mkdir()
    ds = open_dataset(str(root))
    assert ds.classes == ["a", "b", "c"] and [ds[i]["label"] for i in range(len(ds))] == [0, 0, 2, 2]

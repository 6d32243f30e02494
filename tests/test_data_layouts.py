"""The research codebases' own dataset layouts (issue 11): detection, skipped rows, damaged media,
clip names, the audio crop start, and the data commands run on every layout."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.io import wavfile

from avdiag.data import DataError, DataOptions, make_loader, open_dataset
from avdiag.data.research import parse_research_spec
from avdiag.workflows.datasource import DataSource
from data_fixtures import (
    AVE_TRAIN, KS_TEST, KS_TRAIN, VGGSOUND_ROWS, keep_frames, truncate_file, write_ave_ogm, write_corrupt_jpeg,
    write_cremad, write_cremad_pt, write_ks_spaced, write_malicious_pt, write_vggsound, write_vggsound_ogm,
)
from helpers.checkpoints import write_av_checkpoint
from avdiag.data.base import IMAGENET_MEAN, IMAGENET_STD
from test_data import reference_log_stft

SMALL = DataOptions(image_size=32)
# VGGSound rows: vidC_10 (train) has no files, vidE_0 (train) only 3 frames; the added rows keep every
# class with a usable train row, so the class order is the same as with all files present
ROWS = VGGSOUND_ROWS + [("vidG", "0", "dog barking", "train"), ("vidH", "40", "playing guitar, slide", "train")]
OGM_FRAMES = "train-videos/train-set-img/Image-01-FPS"


def _vggsound_flat(root):
    write_vggsound(root, rows=ROWS)
    for name in ("audio/vidC_10.wav",):
        (root / name).unlink()
    shutil.rmtree(root / "Image-01-FPS" / "vidC_10.mp4")
    keep_frames(root / "Image-01-FPS" / "vidE_0.mp4", 3)
    return root


def _vggsound_ogm(root, **options):
    write_vggsound_ogm(root, rows=ROWS, skip_files=("vidC_10",), **options)
    suffix = ".mp4" if options.get("mp4", True) else ""
    keep_frames(root / OGM_FRAMES / f"vidE_0{suffix}", 3)
    return root


def _cremad_pt(root):
    write_cremad_pt(root)
    (root / "audio" / "1002_IEO_HAP_HI.pt").unlink()
    shutil.rmtree(root / "visual" / "1003_TIE_SAD_XX")
    return root


def _ks_spaced(root):
    train = KS_TRAIN + [("short_folder", 4), ("no_audio", 5)]
    write_ks_spaced(root, train=train)
    keep_frames(root / "visual" / "short_folder", 3)
    (root / "audio" / "no_audio.npy").unlink()
    return root


def _ave_ogm(root):
    write_ave_ogm(root, train=AVE_TRAIN + [("Dog", "aveA")])  # aveA listed twice
    (root / "audio_spec" / "aveC.pkl").unlink()
    return root


BUILDERS = {"vggsound-flat": ("vggsound", _vggsound_flat), "vggsound-ogm": ("vggsound", _vggsound_ogm),
            "vggsound-npy": ("vggsound", lambda r: _vggsound_ogm(r, audio="npy", mp4=False)),
            "cremad-pt": ("cremad", _cremad_pt), "ks-spaced": ("ks", _ks_spaced), "ave-ogm": ("ave", _ave_ogm)}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every layout variant once, with its missing clips and short frame folders: name -> spec."""
    base = tmp_path_factory.mktemp("layouts")
    return {key: f"{name}:{build(base / key)}" for key, (name, build) in BUILDERS.items()}


def _skips(ds) -> list[tuple[int, str, str]]:
    return [(r["row"], r["clip"], r["kind"]) for r in ds.report()["skipped"]["rows"]]


# -- detection, skipped rows, reports ---------------------------------------------------------------

def test_vggsound_as_ogm_ge_lays_it_out(layouts):
    ds = open_dataset(layouts["vggsound-ogm"], options=SMALL)
    assert ds.report()["layout"] == ("audio train-audios/train-set/{clip}.wav, "
                                     "frames train-videos/train-set-img/Image-01-FPS/{clip}.mp4/")
    assert [ds.clip_id(i) for i in range(len(ds))] == ["vidB_30", "vidG_0", "vidH_40"]
    assert ds.classes == ["cat meowing", "dog barking", "playing guitar, slide"]
    assert [ds[i]["label"] for i in range(3)] == [0, 1, 2]
    assert _skips(ds) == [(3, "vidC_10", "missing"), (5, "vidE_0", "too few frames")]
    report = ds.report()
    assert report["listed"] == 5 and report["items"] == 3 and report["skipped"]["count"] == 2
    assert "has 3 images, 4 needed" in report["skipped"]["rows"][1]["reason"]
    test = open_dataset(layouts["vggsound-ogm"], split="test", options=SMALL)
    assert test.report()["layout"].startswith("audio test-audios/test-set/{clip}.wav")
    assert [test.clip_id(i) for i in range(3)] == ["vidA_0", "vidD_5", "vidF_20"]
    assert [test[i]["label"] for i in range(3)] == [1, 0, 2]


def test_ogm_ge_layout_gives_the_items_of_the_flat_layout(layouts):
    flat = open_dataset(layouts["vggsound-flat"], options=SMALL)
    ogm = open_dataset(layouts["vggsound-ogm"], options=SMALL)
    assert _skips(flat) == _skips(ogm) and flat.classes == ogm.classes and len(flat) == len(ogm)
    for i in range(len(flat)):
        a, b = flat[i], ogm[i]
        assert a["label"] == b["label"]
        torch.testing.assert_close(a["audio"], b["audio"], rtol=0, atol=0)
        torch.testing.assert_close(a["visual"], b["visual"], rtol=0, atol=0)


def test_vggsound_npy_audio_and_frame_folders_without_mp4(layouts):
    ds = open_dataset(layouts["vggsound-npy"], options=SMALL)
    assert ds.report()["layout"].endswith("{clip}.npy, frames train-videos/train-set-img/Image-01-FPS/{clip}/")
    assert _skips(ds) == [(3, "vidC_10", "missing"), (5, "vidE_0", "too few frames")]
    root = ds.root
    stored = np.load(root / "train-audios" / "train-set" / "vidB_30.npy")
    np.testing.assert_array_equal(ds[0]["audio"].numpy(), stored)   # a precomputed spectrogram, as stored
    assert ds[0]["visual"].shape == (3, 3, 32, 32)


def test_cremad_pt_tensors(layouts):
    ds = open_dataset(layouts["cremad-pt"], options=SMALL)
    assert ds.report()["layout"] == "audio audio/{clip}.pt, frames visual/{clip}/"
    assert [ds.clip_id(i) for i in range(len(ds))] == ["1001_DFA_ANG_XX", "1088_IOM_NEU_XX"]
    assert _skips(ds) == [(2, "1002_IEO_HAP_HI", "missing")]
    stored = torch.load(ds.root / "audio" / "1088_IOM_NEU_XX.pt", weights_only=True)
    torch.testing.assert_close(ds[1]["audio"], stored, rtol=0, atol=0)
    assert ds[1]["label"] == 0 and ds[1]["visual"].shape == (3, 1, 32, 32)
    test = open_dataset(layouts["cremad-pt"], split="test", options=SMALL)
    assert _skips(test) == [(1, "1003_TIE_SAD_XX", "missing")]
    assert "expected frame folder" in test.report()["skipped"]["rows"][0]["reason"]


def test_kinetics_sounds_space_separated_label_last(layouts):
    ds = open_dataset(layouts["ks-spaced"], options=SMALL)
    assert ds.report()["layout"] == "audio audio/{clip}.npy, frames visual/{clip}/"
    assert [ds[i]["label"] for i in range(len(ds))] == [lab for _, lab in KS_TRAIN]
    assert _skips(ds) == [(4, "short_folder", "too few frames"), (5, "no_audio", "missing")]
    stored = np.load(ds.root / "audio" / f"{KS_TRAIN[1][0]}.npy")
    np.testing.assert_array_equal(ds[1]["audio"].numpy(), stored)    # as stored, not fbank-normalised
    # BalanceBenchmark's test-time frames for 8 images: t = i * 2 + 1 -> frames 1, 3, 5 (grey 20, 60, 100)
    visual = ds[0]["visual"]
    for t, grey in enumerate((20, 60, 100)):
        expected = (grey / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(visual[:, t].mean(dim=(1, 2)), expected, atol=0.03, rtol=0)
    assert len(open_dataset(layouts["ks-spaced"], split="test", options=SMALL)) == len(KS_TEST)


def test_ave_as_ogm_ge_reads_it(layouts):
    ds = open_dataset(layouts["ave-ogm"], options=SMALL)
    assert ds.classes == ["Acoustic guitar", "Church bell", "Dog"]
    assert [ds.clip_id(i) for i in range(len(ds))] == ["aveB", "aveD"]
    assert [ds[i]["label"] for i in range(2)] == [1, 2]
    assert _skips(ds) == [(1, "aveA", "duplicate"), (3, "aveC", "missing"), (5, "aveA", "duplicate")]


def test_strict_data_turns_the_first_skip_into_the_one_line_error(layouts):
    with pytest.raises(DataError) as exc:
        open_dataset(layouts["vggsound-ogm"], options=DataOptions(strict=True))
    root = layouts["vggsound-ogm"].split(":", 1)[1]
    assert str(exc.value) == (f"vggsound:{root}: expected {root}/train-audios/train-set/vidC_10.wav "
                              "(listed in vggsound.csv row 3)")


def test_a_split_with_nothing_left_is_an_error(tmp_path):
    root = write_cremad(tmp_path / "crema")
    shutil.rmtree(root / "Image-01-FPS")
    (root / "Image-01-FPS").mkdir()
    with pytest.raises(DataError) as exc:
        open_dataset(f"cremad:{root}")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"cremad:{root}: no train row of train.csv is usable (3 listed, 3 skipped: 3 missing); "
                              "first: row 1 1001_DFA_ANG_XX: expected frame folder"), message


def test_explicit_folders_in_the_spec(tmp_path):
    src = _vggsound_ogm(tmp_path / "ogm")
    root = tmp_path / "elsewhere"
    for split in ("train", "test"):
        shutil.copytree(src / f"{split}-audios" / f"{split}-set", root / "sound" / split)
        shutil.copytree(src / f"{split}-videos" / f"{split}-set-img" / "Image-01-FPS", root / "img" / split)
    shutil.copy(src / "vggsound.csv", tmp_path / "list.csv")
    spec = f"vggsound:{root},audio=sound/{{split}},frames={root}/img/{{split}},list={tmp_path}/list.csv"
    ds = open_dataset(spec, split="test", options=SMALL)
    assert ds.report()["layout"] == "audio sound/test/{clip}.wav, frames img/test/{clip}.mp4/"
    assert len(ds) == 3 and ds.classes == ["cat meowing", "dog barking", "playing guitar, slide"]
    assert parse_research_spec("vggsound", "/a,b,audio=x").root.as_posix() == "/a,b"
    with pytest.raises(DataError, match="unknown option 'audo'"):
        open_dataset(f"vggsound:{root},audo=sound")
    with pytest.raises(DataError, match="found no audio or frame folder of the train split: tried audio sound/"):
        open_dataset(f"vggsound:{root},audio=sound/x,frames=img/x,list={tmp_path}/list.csv")


# -- damaged media ----------------------------------------------------------------------------------

def test_truncated_and_empty_wavs_are_skipped_before_any_number(tmp_path):
    root = write_vggsound(tmp_path / "vgg", rows=ROWS)
    truncate_file(root / "audio" / "vidC_10.wav", 100)       # the header claims 3 s, 56 bytes remain
    (root / "audio" / "vidE_0.wav").write_bytes(b"")
    ds = open_dataset(f"vggsound:{root}", options=SMALL)
    assert [ds.clip_id(i) for i in range(len(ds))] == ["vidB_30", "vidG_0", "vidH_40"]
    reasons = {r["clip"]: r["reason"] for r in ds.report()["skipped"]["rows"]}
    assert reasons["vidC_10"].endswith("vidC_10.wav: truncated: the header claims 96000 bytes of samples, "
                                       "the file holds 56")
    assert reasons["vidE_0"].endswith("vidE_0.wav: empty file")
    with pytest.raises(DataError, match=r"damaged wav file .*vidC_10.wav: truncated.* "
                                        r"\(listed in vggsound.csv row 3\)"):
        open_dataset(f"vggsound:{root}", options=DataOptions(strict=True))


def test_an_undecodable_frame_is_skipped_when_read_and_reported(tmp_path):
    root = write_vggsound(tmp_path / "vgg", rows=ROWS)
    write_corrupt_jpeg(root / "Image-01-FPS" / "vidG_0.mp4" / "frame_1.jpg")
    ds = open_dataset(f"vggsound:{root}", options=SMALL)
    assert len(ds) == 5                                       # found when the item is read, not listed
    for workers in (0, 1):
        batches = list(make_loader(ds, batch_size=2, num_workers=workers))
        assert [i for b in batches for i in b["index"].tolist()] == [0, 1, 2, 4]
    assert _skips(ds) == [(7, "vidG_0", "damaged")]           # once, however many passes
    assert "corrupt or unreadable image" in ds.report()["skipped"]["rows"][0]["reason"]
    strict = open_dataset(f"vggsound:{root}", options=DataOptions(image_size=32, strict=True))
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*frame_1.jpg: .* "
                                        r"\(listed in vggsound.csv row 7\)"):
        list(make_loader(strict, batch_size=2))


def test_damaged_and_malicious_pt_tensors(tmp_path):
    root = write_cremad_pt(tmp_path / "crema")
    (root / "audio" / "1002_IEO_HAP_HI.pt").write_bytes(b"not a zip archive")
    ds = open_dataset(f"cremad:{root}", options=SMALL)
    assert len(list(make_loader(ds, batch_size=3))[0]["label"]) == 2
    assert _skips(ds) == [(2, "1002_IEO_HAP_HI", "damaged")]
    assert "unreadable tensor file" in ds.report()["skipped"]["rows"][0]["reason"]
    sentinel = tmp_path / "ran"
    write_malicious_pt(root / "audio" / "1002_IEO_HAP_HI.pt", sentinel)
    ds = open_dataset(f"cremad:{root}", options=SMALL)
    with pytest.raises(DataError, match=r"refused global posix.system in .*1002_IEO_HAP_HI.pt: only tensors"):
        list(make_loader(ds, batch_size=3))
    assert not sentinel.exists()


# -- the audio crop start ---------------------------------------------------------------------------

def test_audio_start_moves_the_vggsound_crop(tmp_path):
    root = write_vggsound(tmp_path / "vgg")
    _, pcm = wavfile.read(root / "audio" / "vidB_30.wav")
    x = np.tile(pcm.astype(np.float32) / 32768.0, 4)          # 3 s doubled twice: 12 s
    default = open_dataset(f"vggsound:{root}", options=SMALL)[0]["audio"].numpy()
    np.testing.assert_allclose(default, reference_log_stft(x[40000:120000], 256, 128), atol=2e-3)
    for start in (0.0, 1.25, 9.0):
        item = open_dataset(f"vggsound:{root}", options=DataOptions(image_size=32, audio_start=start))[0]
        first = int(start * 16000)
        crop = np.tile(x, 2)[first:first + 80000]
        np.testing.assert_allclose(item["audio"].numpy(), reference_log_stft(crop, 256, 128), atol=2e-3, rtol=1e-3)
        assert not np.allclose(item["audio"].numpy(), default, atol=0.1)   # another crop than the default


def test_audio_start_is_refused_where_there_is_no_crop(layouts):
    with pytest.raises(DataError, match=r"precomputed \(.npy files\)"):
        open_dataset(layouts["vggsound-npy"], options=DataOptions(audio_start=1.0))
    with pytest.raises(DataError, match="not to synthetic"):
        open_dataset("synthetic:n=4", options=DataOptions(audio_start=1.0))
    with pytest.raises(DataError, match="audio_start must be >= 0"):
        DataOptions(audio_start=-1.0).validate()


# -- DataSource: report and clip names --------------------------------------------------------------

def test_datasource_report_and_clip_names(layouts):
    source = DataSource(layouts["vggsound-ogm"], options=SMALL, batch_size=2, device="cpu")
    assert sum(len(b["label"]) for b in source.loader()) == 3
    source.dataset("test")
    report = source.report()
    assert set(report["splits"]) == {"train", "test"} and report["strict"] is False
    assert report["skipped"]["count"] == 2 and report["skipped"]["by_kind"] == {"missing": 1, "too few frames": 1}
    assert report["skipped"]["rows"][0] == {
        "split": "train", "row": 3, "clip": "vidC_10", "kind": "missing",
        "reason": f"expected {source.dataset().root}/train-audios/train-set/vidC_10.wav"}
    assert source.clip_ids() == {0: "vidB_30", 1: "vidG_0", 2: "vidH_40"}
    assert DataSource("synthetic:n=4", device="cpu").clip_ids() == {}
    with pytest.raises(DataError, match="vidC_10.wav"):
        DataSource(layouts["vggsound-ogm"], options=SMALL, device="cpu", strict_data=True).dataset()


def test_skips_found_by_another_process_are_merged(tmp_path):
    """What a torchrun rank found damaged in its own batches reaches rank 0's report."""
    root = write_vggsound(tmp_path / "vgg", rows=ROWS)
    write_corrupt_jpeg(root / "Image-01-FPS" / "vidG_0.mp4" / "frame_1.jpg")
    reader, root_rank = (DataSource(f"vggsound:{root}", options=SMALL, device="cpu") for _ in range(2))
    list(reader.loader())
    root_rank.dataset()
    assert root_rank.report()["skipped"]["count"] == 0
    root_rank.add_skipped(reader.skipped_rows())
    root_rank.add_skipped(reader.skipped_rows())                # the same row twice is one skip
    assert root_rank.report()["skipped"] == reader.report()["skipped"]
    assert root_rank.report()["skipped"]["rows"][0]["clip"] == "vidG_0"


# -- the commands on every layout -------------------------------------------------------------------

N_CLASSES = {"vggsound": 3, "cremad": 6, "ks": 31, "ave": 3}
ARGS = ("--image-size", "32", "--batch-size", "2", "--device", "cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    return {name: write_av_checkpoint(base / f"{name}.pt", "ogm-ge", n_classes=n, width=4, prefix="").path
            for name, n in N_CLASSES.items()}


@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_inspect_reinit_and_conflict_run_on_every_layout(layout, layouts, checkpoints, cli, tmp_path):
    spec = layouts[layout]
    ckpt = checkpoints[spec.split(":", 1)[0]]
    inspected = cli("inspect", ckpt, "--data", spec, *ARGS, "--json", "-").json()
    skipped = inspected["data"]["skipped"]
    assert skipped["count"] >= 1 and all({"row", "clip", "reason"} <= set(r) for r in skipped["rows"])
    assert inspected["probe"]["samples"] == inspected["data"]["splits"]["train"]["items"]
    out = tmp_path / "out.pt"
    rewritten = cli("reinit", ckpt, "--method", "recalibrate", "--data", spec, *ARGS, "--out", out,
                    "--json", "-").json()
    assert out.is_file() and rewritten["data"]["skipped"] == skipped
    table = tmp_path / "samples.csv"
    conflict = cli("conflict", ckpt, "--data", spec, *ARGS, "--samples", table, "--json", "-").json()
    assert conflict["data"]["skipped"]["count"] >= 1 and conflict["data"]["name"] == spec.split(":", 1)[0]
    clips = {r["clip"] for r in conflict["conflict"]["samples"]}
    assert clips and None not in clips and not clips & {r["clip"] for r in skipped["rows"]}
    assert set(pd.read_csv(table, dtype={"clip": str})["clip"]) == clips
    worst = conflict["modalities"]["audio"]["conflict"]["most_conflicting"]
    assert worst and all(r["clip"] in clips for r in worst)
    text = cli("conflict", ckpt, "--data", spec, *ARGS).ok().out
    assert f"data: skipped {conflict['data']['skipped']['count']} of " in text and "--strict-data" in text


def test_conflict_on_the_ogm_ge_layout_equals_the_flat_layout(layouts, checkpoints, cli):
    runs = {}
    for key in ("vggsound-flat", "vggsound-ogm"):
        runs[key] = cli("conflict", checkpoints["vggsound"], "--data", layouts[key], *ARGS, "--json", "-").json()
    flat, ogm = runs["vggsound-flat"], runs["vggsound-ogm"]
    for key in ("modalities", "ogm", "opm"):
        _assert_same(flat[key], ogm[key])
    _assert_same(flat["conflict"]["samples"], ogm["conflict"]["samples"])
    assert flat["summary"]["dominant"] == ogm["summary"]["dominant"]
    assert [r["clip"] for r in flat["conflict"]["samples"]] == ["vidB_30", "vidG_0", "vidH_40"]


def _assert_same(a, b, where="") -> None:
    """Equal structures; floats equal up to summation order (threaded CPU kernels differ by ~1e-9
    between two runs of one layout)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            if k == "most_conflicting":  # near-equal cosines (all ~1.0 here) may swap places within noise
                _assert_same(*(sorted(x[k], key=lambda r: r["index"]) for x in (a, b)), f"{where}.{k}")
            else:
                _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), where
    else:
        assert a == b, where


def test_strict_data_and_audio_start_on_the_command_line(layouts, checkpoints, cli):
    message = cli("inspect", checkpoints["vggsound"], "--data", layouts["vggsound-ogm"], *ARGS,
                  "--strict-data").error()
    assert message.endswith("train-audios/train-set/vidC_10.wav (listed in vggsound.csv row 3)")
    assert cli("inspect", checkpoints["vggsound"], "--strict-data").error() == "--strict-data is used with --data"
    message = cli("conflict", checkpoints["vggsound"], "--data", layouts["vggsound-npy"], *ARGS,
                  "--audio-start", "1").error()
    assert "the audio start applies to wav files only" in message

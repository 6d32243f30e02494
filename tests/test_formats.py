"""Every checkpoint format and nesting finds the same planted channels, and the CLI's outputs.

One planted ResNet-18 (width 8) is written in each format and wrapped in each nesting a training
script produces; the dead and abnormal channels reported must equal the planted ones exactly, and
``checkpoint.format`` / ``checkpoint.unwrapped`` must say how the tensors were found.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import avdiag
from helpers.checkpoints import write_av_checkpoint
from helpers.cli import strict_json
from layout_fixtures import channels_by_layer, planted_encoder, sha256_file, state_dict


@pytest.fixture(scope="module")
def encoder():
    """(model, Planted) for a single planted ResNet-18; do not modify the model."""
    return planted_encoder()


@pytest.fixture(scope="module")
def sd(encoder):
    return state_dict(encoder[0])


def _report(path, **kwargs) -> dict:
    load = {k: kwargs.pop(k) for k in ("allow_globals", "unsafe", "modality", "bn_eps") if k in kwargs}
    return avdiag.inspect(path, load=avdiag.LoadOptions(**load), **kwargs).to_dict()


def _assert_planted(report: dict, planted, prefix: str = "") -> None:
    """Exactly the planted channels are dead / abnormal, and nothing else is flagged as broken."""
    planted = planted.prefixed(prefix)
    assert channels_by_layer(report) == planted.dead
    assert channels_by_layer(report, "abnormal_channels") == planted.abnormal
    for key in ("nonfinite_channels", "possibly_dead_channels", "collapsed_filter_channels"):
        assert channels_by_layer(report, key) == {}, key
    assert report["summary"]["n_dead"] == sum(len(v) for v in planted.dead.values())


def _expected_conv(bn: str) -> str:
    """torchvision naming: bn1 <- conv1, layerN.i.bn2 <- layerN.i.conv2, downsample.1 <- downsample.0."""
    return bn[:-1] + "0" if bn.endswith("downsample.1") else bn.replace("bn", "conv")


def _save(obj, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **kwargs)
    return path


def _optimizer_state() -> dict:
    """A real SGD state dict with momentum buffers (over a stand-in parameter)."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


# --- file formats ------------------------------------------------------------------------


def _write_shards(sd: dict, folder: Path, kind: str, n: int = 3) -> tuple[Path, list[Path]]:
    """Hugging Face style sharded checkpoint: n shards + index; returns (index, shard paths)."""
    folder.mkdir(parents=True)
    names = list(sd)
    step = -(-len(names) // n)
    weight_map, shards = {}, []
    for i in range(n):
        part = {k: sd[k] for k in names[i * step:(i + 1) * step]}
        if kind == "safetensors":
            shard = folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(part, str(shard))
        else:
            shard = folder / f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(part, shard)
        weight_map.update({k: shard.name for k in part})
        shards.append(shard)
    index_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = folder / index_name
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index, shards


SINGLE_FILE_CASES = {
    # case: (file name, writer, expected format)
    "zip-pt": ("model.pt", lambda sd, p: torch.save(sd, p), "torch-zip"),
    "zip-pth": ("model.pth", lambda sd, p: torch.save(sd, p), "torch-zip"),
    "zip-bin": ("pytorch_model.bin", lambda sd, p: torch.save(sd, p), "torch-zip"),
    "zip-ckpt": ("last.ckpt", lambda sd, p: torch.save(sd, p), "torch-zip"),
    "legacy": ("model.pth", lambda sd, p: torch.save(sd, p, _use_new_zipfile_serialization=False),
               "torch-legacy"),
    "safetensors": ("model.safetensors", lambda sd, p: save_file(sd, str(p)), "safetensors"),
    # detection is by content: a safetensors file under a torch name is still safetensors
    "safetensors-named-pt": ("weights.pt", lambda sd, p: save_file(sd, str(p)), "safetensors"),
}


@pytest.mark.parametrize("case", list(SINGLE_FILE_CASES))
def test_single_file_formats_find_the_planted_channels(case, encoder, sd, tmp_path):
    name, write, fmt = SINGLE_FILE_CASES[case]
    path = tmp_path / name
    write(sd, path)
    before = sha256_file(path)

    report = _report(path)

    ck = report["checkpoint"]
    assert ck["format"] == fmt
    assert ck["unwrapped"] == [] and ck["extras"] == []
    assert ck["n_tensors"] == len(sd)
    assert ck["size_bytes"] == path.stat().st_size
    # read-only: the file is byte-identical, and the report's digest is the file's
    assert sha256_file(path) == before == ck["sha256"]
    _assert_planted(report, encoder[1])
    assert len(report["layers"]) == 20
    for layer in report["layers"]:
        assert layer["conv"] == _expected_conv(layer["name"]), layer["name"]
        assert layer["activation_source"] == "architecture:resnet"


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("target", ["folder", "index"])
def test_sharded_checkpoints(kind, target, encoder, sd, tmp_path):
    index, shards = _write_shards(sd, tmp_path / "ckpt", kind)
    before = {p: sha256_file(p) for p in [index, *shards]}

    report = _report(index.parent if target == "folder" else index)

    ck = report["checkpoint"]
    assert ck["format"] == "sharded"
    assert ck["n_tensors"] == len(sd)
    assert len(ck["unwrapped"]) == 1 and index.name in ck["unwrapped"][0]["value"]
    assert re.search(r"\b3 shards\b", ck["unwrapped"][0]["value"]), ck["unwrapped"]
    assert ck["size_bytes"] == sum(p.stat().st_size for p in before)
    assert {p: sha256_file(p) for p in before} == before
    _assert_planted(report, encoder[1])


def test_sharded_digest_is_the_same_for_the_folder_and_its_index(sd, tmp_path):
    index, _ = _write_shards(sd, tmp_path / "ckpt", "safetensors")
    by_folder = _report(index.parent)["checkpoint"]["sha256"]
    by_index = _report(index)["checkpoint"]["sha256"]
    assert by_folder == by_index and len(by_folder) == 64


def test_sharded_folder_with_both_indexes_prefers_safetensors(sd, tmp_path):
    folder = tmp_path / "ckpt"
    index, _ = _write_shards(sd, folder, "safetensors")
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: "pytorch_model.bin" for k in sd}}))
    report = _report(folder)
    assert index.name in report["checkpoint"]["unwrapped"][0]["value"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="saving CUDA tensors needs a GPU")
@pytest.mark.parametrize("legacy", [True, False])
def test_checkpoint_of_cuda_tensors_loads_onto_the_cpu(legacy, encoder, sd, tmp_path):
    path = _save({"model": {k: v.cuda() for k, v in sd.items()}}, tmp_path / "cuda.pth",
                 _use_new_zipfile_serialization=not legacy)
    report = _report(path)
    assert report["checkpoint"]["format"] == ("torch-legacy" if legacy else "torch-zip")
    _assert_planted(report, encoder[1])


# --- graph formats: TorchScript and torch.export ----------------------------------------------


class _ScriptableTrunk(nn.Module):
    """The encoder's modules under the same names, with a forward torch.jit.script accepts
    (ResNetEncoder.forward formats ``tuple(x.shape)`` in an error message, which TorchScript rejects)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        for name, child in encoder.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


GRAPH_EPS_LAYER = "layer1.0.bn1"  # given eps=1e-3 in the graph models: the report must take it from the graph


@pytest.fixture(scope="module")
def graph_files(encoder, tmp_path_factory):
    model = copy.deepcopy(encoder[0]).eval()
    dict(model.named_modules())[GRAPH_EPS_LAYER].eps = 1e-3
    x = torch.randn(1, 3, 32, 32)
    root = tmp_path_factory.mktemp("graphs")
    files = {"script": root / "scripted.pt", "trace": root / "traced.pt", "export": root / "exported.pt2"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still in use
        torch.jit.script(_ScriptableTrunk(model)).save(str(files["script"]))
        torch.jit.trace(model, x).save(str(files["trace"]))
    torch.export.save(torch.export.export(model, (x,)), files["export"])
    return files


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("kind, fmt, module", [
    ("script", "torchscript", "TorchScript"),
    ("trace", "torchscript", "TorchScript"),
    ("export", "torch-export", "torch.export program"),
])
def test_graph_formats_read_what_each_batchnorm_feeds(kind, fmt, module, graph_files, encoder, sd):
    path = graph_files[kind]
    before = sha256_file(path)
    report = _report(path)

    ck = report["checkpoint"]
    assert ck["format"] == fmt
    assert ck["unwrapped"] == [{"kind": "module", "value": module}]
    assert sha256_file(path) == before == ck["sha256"]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == {k[: -len(".running_mean")] for k in sd if k.endswith(".running_mean")}
    for name, layer in layers.items():
        assert layer["activation_source"] == f"graph:{fmt}", name
        assert layer["conv"] == _expected_conv(name) and layer["conv_source"] == "graph", name
        if name.endswith("bn1"):  # stem and block bn1 feed a ReLU
            assert (layer["feeds_activation"], layer["activation"]) == ("yes", "relu"), name
        else:  # bn2 and downsample.1 feed the residual add
            assert layer["feeds_activation"] == "no", name
    assert layers[GRAPH_EPS_LAYER]["eps"] == pytest.approx(1e-3)
    assert layers[GRAPH_EPS_LAYER]["eps_source"] == "graph"
    assert layers["bn1"]["eps"] == pytest.approx(1e-5)
    # the decoys (dead values in bn2 / downsample.1) feed the add: not dead
    _assert_planted(report, encoder[1])


# --- nesting -------------------------------------------------------------------------------


def _lightning(sd):
    return {"state_dict": {"model." + k: v for k, v in sd.items()}, "pytorch-lightning_version": "2.4.0",
            "epoch": 3, "global_step": 10, "optimizer_states": [_optimizer_state()],
            "hyper_parameters": {"lr": 0.1}}


NESTING_CASES = {
    # case: (build(sd), unwrapped, extras, prefix left on the reported layer names)
    "bare": (lambda sd: sd, [], [], ""),
    "model": (lambda sd: {"model": sd}, [{"kind": "key", "value": "model"}], [], ""),
    "state_dict": (lambda sd: {"state_dict": sd}, [{"kind": "key", "value": "state_dict"}], [], ""),
    "model_state_dict": (
        lambda sd: {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": _optimizer_state()},
        [{"kind": "key", "value": "model_state_dict"}], ["epoch", "optimizer_state_dict"], ""),
    "lightning": (_lightning, [{"kind": "lightning", "value": "state_dict"}],
                  ["epoch", "global_step", "hyper_parameters", "optimizer_states", "pytorch-lightning_version"],
                  "model."),
    "dataparallel": (lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
                     [{"kind": "key", "value": "model"}, {"kind": "prefix", "value": "module."}], [], ""),
    "compile": (lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
                [{"kind": "prefix", "value": "_orig_mod."}], [], ""),
    "dataparallel-compile": (lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
                             [{"kind": "prefix", "value": "module."}, {"kind": "prefix", "value": "_orig_mod."}],
                             [], ""),
}


@pytest.mark.parametrize("case", list(NESTING_CASES))
def test_nesting_is_unwrapped(case, encoder, sd, tmp_path):
    build, unwrapped, extras, prefix = NESTING_CASES[case]
    path = _save(build(sd), tmp_path / "ckpt.pt")

    report = _report(path)

    ck = report["checkpoint"]
    assert ck["format"] == "torch-zip"
    assert ck["unwrapped"] == unwrapped
    assert sorted(ck["extras"]) == extras
    _assert_planted(report, encoder[1], prefix)
    # no wrapper prefix survives on a layer name; the library API gives the same clean names
    assert not any(l["name"].startswith(("module.", "_orig_mod.")) for l in report["layers"])
    assert sorted(avdiag.load_checkpoint(path).tensors.names()) == sorted(prefix + k for k in sd)


def test_numpy_scalar_next_to_the_weights_loads_by_default(encoder, sd, tmp_path, cli):
    """Research scripts save numpy accuracies next to the weights; the safe loader admits them."""
    path = _save({"model": sd, "acc": np.float64(0.61), "best_acc": np.float32(0.7), "epoch": 3,
                  "optimizer": _optimizer_state()}, tmp_path / "best.pth")
    report = cli("inspect", path, "--json", "-").json()
    assert sorted(report["checkpoint"]["extras"]) == ["acc", "best_acc", "epoch", "optimizer"]
    _assert_planted(report, encoder[1])


# --- NaN / Inf, nothing to scan --------------------------------------------------------------


def test_nonfinite_tensors_are_named_and_their_channels_not_called_dead(encoder, sd, tmp_path, cli):
    bad = {k: v.clone() for k, v in sd.items()}
    bad["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad["layer1.0.bn1.running_var"][3] = float("inf")  # channel 3 of layer1.0.bn1 is a planted dead one
    path = _save(bad, tmp_path / "nan.pt")

    report = cli("inspect", path, "--json", "-", "--per-channel").json()  # strict: no NaN / Infinity, even per channel

    nonfinite = [f for f in report["findings"] if f["id"] == "nonfinite-tensor"]
    assert sorted(f["location"] for f in nonfinite) == ["layer1.0.bn1.running_var", "layer1.0.conv1.weight"]
    assert all(f["severity"] == "error" for f in nonfinite)
    assert report["summary"]["nonfinite_tensors"] == {"layer1.0.conv1.weight": 1, "layer1.0.bn1.running_var": 1}
    assert channels_by_layer(report, "nonfinite_channels") == {"layer1.0.bn1": [3]}
    expected_dead = dict(encoder[1].dead, **{"layer1.0.bn1": [0, 7]})
    assert channels_by_layer(report) == expected_dead
    assert channels_by_layer(report, "collapsed_filter_channels") == {}
    layer = next(l for l in report["layers"] if l["name"] == "layer1.0.bn1")
    assert layer["per_channel"]["running_var"][3] is None  # JSON null (schema 1.1)


def test_checkpoint_without_batchnorm_is_analysed_with_a_finding(tmp_path, cli):
    path = _save({"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}, tmp_path / "mlp.pt")
    report = cli("inspect", path, "--json", "-").json()
    assert report["layers"] == []
    assert [f["id"] for f in report["findings"]] == ["no-batchnorm"]


def test_checkpoint_without_tensors_is_an_error_of_one_line(tmp_path, cli):
    path = _save({"epoch": 3}, tmp_path / "empty.pt")
    assert cli("inspect", path).error() == f"{path}: holds no tensors (nothing to analyse)"


# --- CLI outputs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def av_ckpt(tmp_path_factory):
    """An OGM-GE checkpoint saved as its training script saves it, with its Planted record."""
    path = tmp_path_factory.mktemp("av") / "ogm_ge.pt"
    written = write_av_checkpoint(path, "ogm-ge", planted=True, extra={
        "saved_epoch": 30, "fusion": "concat", "acc": 0.61, "optimizer": _optimizer_state()})
    return path, written.planted


def test_json_to_a_file_is_the_library_report(av_ckpt, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that rich keeps the summary on one line
    path, planted = av_ckpt
    out_file = tmp_path / "report.json"
    stdout = cli("inspect", path, "--json", out_file).ok().out
    report = strict_json(out_file.read_text())
    assert report == json.loads(json.dumps(_report(path)))
    assert channels_by_layer(report) == planted.dead
    assert report["checkpoint"]["sha256"] == sha256_file(path)
    assert report["summary"]["text"] in stdout  # the terminal report still goes to stdout


def test_json_to_stdout_prints_only_json(av_ckpt, cli):
    path, planted = av_ckpt
    report = cli("inspect", path, "--json", "-").json()  # raises on anything but one JSON document
    assert report["schema_version"] == "1.1"
    assert report["layout"]["name"] == "ogm-ge"
    assert {m: s["n_dead"] for m, s in report["modalities"].items()} == planted.dead_by_modality
    assert all("per_channel" not in layer for layer in report["layers"])


def test_per_channel_arrays_have_one_value_per_channel(av_ckpt, cli):
    path, planted = av_ckpt
    report = cli("inspect", path, "--json", "-", "--per-channel").json()
    for layer in report["layers"]:
        arrays = layer["per_channel"]
        assert {"gamma", "beta", "running_mean", "running_var", "z"} <= set(arrays)
        assert all(len(values) == layer["channels"] for values in arrays.values()), layer["name"]
    stem = next(l for l in report["layers"] if l["name"] == "audio_net.bn1")
    assert all(stem["per_channel"]["z"][c] < -3 for c in planted.dead["audio_net.bn1"])
    assert stem["per_channel"]["gamma"][1] == pytest.approx(0.05)


def test_quiet_prints_one_line(av_ckpt, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the terminal width rich lays out for, whatever runs the tests
    path, planted = av_ckpt
    lines = cli("inspect", path, "--quiet").ok().out.strip().splitlines()
    assert lines == [avdiag.inspect(path).summary_line()]
    assert lines[0].startswith(f"{sum(planted.dead_by_modality.values())} dead of ")


def test_modality_option_sets_a_user_layout(av_ckpt, cli):
    path, planted = av_ckpt
    report = cli("inspect", path, "--json", "-", "--modality", "audio=audio_net", "--modality",
                 "visual=visual_net").json()
    assert report["layout"]["source"] == "user"
    assert report["layout"]["modalities"] == {"audio": "audio_net.", "visual": "visual_net."}
    assert {m: s["n_dead"] for m, s in report["modalities"].items()} == planted.dead_by_modality


def test_modality_prefix_matching_nothing_is_a_usage_error(av_ckpt, cli):
    path, _ = av_ckpt
    message = cli("inspect", path, "--modality", "audio=sound_net").error()
    assert message == "--modality audio=sound_net: no tensor name starts with 'sound_net.'"

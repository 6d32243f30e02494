"""`avdiag.diff` and `render_diff` on small OGM-GE checkpoints with planted, revived and new dead
channels, plus the element-wise comparison on hand-made tensors.

Every expected value is computed here with numpy from the state dicts written to disk, never with
avdiag's own helpers.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from avdiag.errors import UsageError
from avdiag import diff
from avdiag.measure import compare as diff_module
from avdiag.measure.compare import compare_values
from avdiag.report.terminal.diff import render_diff
from helpers.checkpoints import av_model
from helpers.cli import strict_json
from helpers.terminal import rows_by
from layout_fixtures import state_dict

DEAD_GAMMA, DEAD_BETA = 0.05, -0.5

# A: planted dead channels (all in BNs that feed a ReLU: a block's bn1)
A_DEAD = {"audio_net.layer1.0.bn1": [0, 3, 5, 7], "visual_net.layer2.1.bn1": [2, 9]}
# B = A, then: revive some, kill others
REVIVE = {"audio_net.layer1.0.bn1": [3, 7]}
KILL = {"audio_net.layer1.0.bn1": [1], "visual_net.layer3.0.bn1": [4, 20, 31]}
CONV_CHANNELS = [1, 6]  # rows of audio_net.layer2.0.conv1.weight nudged in B (16 output channels)
NAN_AT = (0, 0, 0, 0)  # NaN at the same place in A and B of visual_net.layer4.0.conv1.weight

EXPECTED_CHANGED = {
    "audio_net.layer1.0.bn1.weight", "audio_net.layer1.0.bn1.bias",
    "visual_net.layer3.0.bn1.weight", "visual_net.layer3.0.bn1.bias",
    "audio_net.layer2.0.conv1.weight",
    "audio_net.layer4.1.bn2.running_var",
    "visual_net.layer4.0.conv1.weight",
    "audio_net.layer1.1.bn2.num_batches_tracked",  # dtype only
    "fusion_module.fc_out.weight", "fusion_module.fc_out.bias",  # shape: 6 -> 7 classes
}
EXPECTED_ADDED = ["fusion_module.extra_scale"]
EXPECTED_REMOVED = ["visual_net.bn1.num_batches_tracked"]


def _set_channels(sd: dict[str, torch.Tensor], plan: dict[str, list[int]], gamma: float, beta: float) -> None:
    for layer, channels in plan.items():
        sd[layer + ".weight"][channels] = gamma
        sd[layer + ".bias"][channels] = beta


def _state_a() -> dict[str, torch.Tensor]:
    sd = state_dict(av_model("ogm-ge", realistic=True)[0])
    _set_channels(sd, A_DEAD, DEAD_GAMMA, DEAD_BETA)
    sd["visual_net.layer4.0.conv1.weight"][NAN_AT] = float("nan")
    return sd


def _state_b(a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in a.items()}
    _set_channels(sd, REVIVE, 1.0, 0.0)
    _set_channels(sd, KILL, DEAD_GAMMA, DEAD_BETA)
    sd["audio_net.layer2.0.conv1.weight"][CONV_CHANNELS] += 0.1
    sd["audio_net.layer4.1.bn2.running_var"][10] *= 2.0
    sd["visual_net.layer4.0.conv1.weight"][3, 1] -= 0.25  # one 3x3 kernel, next to the shared NaN
    sd["audio_net.layer1.1.bn2.num_batches_tracked"] = sd["audio_net.layer1.1.bn2.num_batches_tracked"].to(torch.int32)
    gen = torch.Generator().manual_seed(1)
    sd["fusion_module.fc_out.weight"] = torch.randn(7, 128, generator=gen)
    sd["fusion_module.fc_out.bias"] = torch.zeros(7)
    sd["fusion_module.extra_scale"] = torch.ones(1)
    del sd["visual_net.bn1.num_batches_tracked"]
    return sd


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    a = _state_a()
    b = _state_b(a)
    torch.save(a, root / "a.pt")
    torch.save(b, root / "b.pt")
    return root, a, b


@pytest.fixture(scope="module")
def result(pair):
    root, _, _ = pair
    return diff(root / "a.pt", root / "b.pt")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _expected_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = _np(a), _np(b)
    keep = ~(np.isnan(x) & np.isnan(y))
    return float(np.linalg.norm((y - x)[keep]) / np.linalg.norm(x[keep]))


def _expected_max(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = _np(a), _np(b)
    keep = ~(np.isnan(x) & np.isnan(y))
    return float(np.abs(y - x)[keep].max())


# ---- tensors ------------------------------------------------------------------------------------


def test_added_removed_changed_names(result, pair):
    _, a, b = pair
    assert result.added == EXPECTED_ADDED
    assert result.removed == EXPECTED_REMOVED
    assert {c.name for c in result.changed} == EXPECTED_CHANGED
    common = set(a) & set(b)
    assert result.n_unchanged == len(common) - len(EXPECTED_CHANGED)
    assert result.a.n_tensors == len(a) and result.b.n_tensors == len(b)
    assert not result.identical_tensors and not result.identical_files


def test_reasons_and_changed_channels(result):
    by = {c.name: c for c in result.changed}
    assert by["fusion_module.fc_out.weight"].reasons == ["shape"]
    assert by["fusion_module.fc_out.weight"].shape_a == (6, 128)
    assert by["fusion_module.fc_out.weight"].shape_b == (7, 128)
    assert by["fusion_module.fc_out.weight"].rel_change is None
    nbt = by["audio_net.layer1.1.bn2.num_batches_tracked"]
    assert nbt.reasons == ["dtype"] and (nbt.dtype_a, nbt.dtype_b) == ("int64", "int32")
    assert nbt.n_changed_elements == 0 and nbt.rel_change == 0.0 and nbt.max_abs_diff == 0.0
    expected_channels = {
        "audio_net.layer1.0.bn1.weight": ([1, 3, 7], 8),
        "audio_net.layer1.0.bn1.bias": ([1, 3, 7], 8),
        "visual_net.layer3.0.bn1.weight": ([4, 20, 31], 32),
        "visual_net.layer3.0.bn1.bias": ([4, 20, 31], 32),
        "audio_net.layer2.0.conv1.weight": (CONV_CHANNELS, 16),
        "audio_net.layer4.1.bn2.running_var": ([10], 64),
        "visual_net.layer4.0.conv1.weight": ([3], 64),
    }
    for name, (channels, total) in expected_channels.items():
        c = by[name]
        assert c.reasons == ["values"], name
        assert c.changed_channels == channels, name
        assert (c.n_channels_changed, c.channels) == (len(channels), total), name
    assert by["fusion_module.fc_out.weight"].channels is None  # a Linear weight is not per channel here
    conv = by["audio_net.layer2.0.conv1.weight"]
    assert conv.n_changed_elements == len(CONV_CHANNELS) * 8 * 9
    assert by["visual_net.layer4.0.conv1.weight"].n_changed_elements == 9  # one 3x3 kernel


def test_relative_change_and_max_diff_match_numpy(result, pair):
    _, a, b = pair
    for c in result.changed:
        if c.reasons == ["values"]:
            assert c.rel_change == pytest.approx(_expected_rel(a[c.name], b[c.name]), rel=1e-12), c.name
            assert c.max_abs_diff == pytest.approx(_expected_max(a[c.name], b[c.name]), rel=1e-12), c.name
            assert math.isfinite(c.rel_change)  # the NaN both sides share is left out of both norms
    var = next(c for c in result.changed if c.name == "audio_net.layer4.1.bn2.running_var")
    rv = _np(a["audio_net.layer4.1.bn2.running_var"])
    assert var.rel_change == pytest.approx(rv[10] / np.linalg.norm(rv), rel=1e-12)


def test_frame_has_one_row_per_changed_tensor(result):
    frame = result.to_frame()
    assert len(frame) == len(EXPECTED_CHANGED)
    assert set(frame["name"]) == EXPECTED_CHANGED
    row = frame.set_index("name").loc["audio_net.layer2.0.conv1.weight"]
    assert row["n_channels_changed"] == 2 and row["channels"] == 16 and row["reasons"] == "values"
    assert frame.set_index("name")["rel_change"].isna().sum() == 2  # the two shape changes


# ---- BN layers and modalities -------------------------------------------------------------------


def test_dead_verdicts_of_the_fixture(result):
    """The inspections see exactly the planted channels (else the died/revived checks mean nothing)."""
    dead_a = {v.layer.name: v.dead for v in result.inspect_a.layers if v.dead}
    dead_b = {v.layer.name: v.dead for v in result.inspect_b.layers if v.dead}
    assert dead_a == A_DEAD
    assert dead_b == {"audio_net.layer1.0.bn1": [0, 1, 5], "visual_net.layer2.1.bn1": [2, 9],
                      "visual_net.layer3.0.bn1": [4, 20, 31]}


def test_died_and_revived_per_layer(result, pair):
    _, a, b = pair
    layers = {layer.name: layer for layer in result.bn_layers}
    assert len(layers) == len(result.inspect_a.layers)
    died = {n: layer.died for n, layer in layers.items() if layer.died}
    revived = {n: layer.revived for n, layer in layers.items() if layer.revived}
    assert died == {"audio_net.layer1.0.bn1": [1], "visual_net.layer3.0.bn1": [4, 20, 31]}
    assert revived == {"audio_net.layer1.0.bn1": [3, 7]}
    changed = {n for n, layer in layers.items() if layer.status != "unchanged"}
    assert changed == {"audio_net.layer1.0.bn1", "visual_net.layer3.0.bn1", "audio_net.layer4.1.bn2"}
    assert layers["visual_net.layer2.1.bn1"].status == "unchanged"  # dead in both: neither died nor revived
    assert layers["visual_net.layer2.1.bn1"].died == layers["visual_net.layer2.1.bn1"].revived == []

    stem = layers["audio_net.layer1.0.bn1"]
    assert stem.n_channels_changed == 3 and stem.changed_channels == [1, 3, 7]
    for key, role in (("gamma", "weight"), ("beta", "bias")):
        name = f"audio_net.layer1.0.bn1.{role}"
        assert stem.rel_change[key] == pytest.approx(_expected_rel(a[name], b[name]), rel=1e-12)
    assert stem.rel_change["running_mean"] == 0.0 and stem.rel_change["running_var"] == 0.0
    bn2 = layers["audio_net.layer4.1.bn2"]
    assert bn2.rel_change["gamma"] == 0.0 and bn2.rel_change["running_var"] > 0
    assert bn2.n_channels_changed == 1 and bn2.died == [] and bn2.revived == []


def test_per_modality_counts(result, pair):
    _, a, b = pair
    audio, visual, other = result.modalities["audio"], result.modalities["visual"], result.modalities["other"]
    assert list(result.modalities) == ["audio", "visual", "other"]
    assert (audio.n_dead_before, audio.n_dead_after, audio.n_died, audio.n_revived) == (4, 3, 1, 2)
    assert (visual.n_dead_before, visual.n_dead_after, visual.n_died, visual.n_revived) == (2, 5, 3, 0)
    assert (audio.n_changed_tensors, visual.n_changed_tensors, other.n_changed_tensors) == (5, 3, 2)
    assert (other.n_added_tensors, visual.n_removed_tensors) == (1, 1)
    common = set(a) & set(b)
    assert audio.n_tensors == sum(n.startswith("audio_net.") for n in common)
    assert visual.n_tensors == sum(n.startswith("visual_net.") for n in common)
    assert audio.n_bn_channels_before == audio.n_bn_channels_after == 600
    rels = []
    for c in result.changed:
        if c.modality == "audio":
            rels.append(0.0 if c.reasons == ["dtype"] else _expected_rel(a[c.name], b[c.name]))
    assert audio.mean_rel_change == pytest.approx(np.mean(rels), rel=1e-12)
    assert other.mean_rel_change is None  # shape changes only
    assert (result.n_dead_before, result.n_dead_after, result.n_died, result.n_revived) == (6, 8, 4, 2)


def test_summary_line_and_json(result):
    line = result.summary_line()
    assert line.startswith("10 changed, 1 added, 1 removed, ")
    assert "dead BN channels 6 -> 8 (4 died, 2 revived; audio 4->3, visual 2->5)" in line
    report = strict_json(json.dumps(result.to_dict(), allow_nan=False))
    assert report["schema_version"] == "1.1"
    assert report["tool"]["command"] == "diff" and report["tool"]["name"] == "avdiag"
    assert report["a"]["sha256"] == result.a.sha256 and len(report["b"]["sha256"]) == 64
    assert report["summary"]["n_changed"] == 10 and report["summary"]["text"] == line
    assert report["added"] == EXPECTED_ADDED and report["removed"] == EXPECTED_REMOVED
    layer = next(x for x in report["bn_layers"] if x["name"] == "audio_net.layer1.0.bn1")
    assert layer["died"] == [1] and layer["revived"] == [3, 7] and layer["n_dead_before"] == 4
    assert report["modalities"]["visual"]["n_died"] == 3


# ---- identical weights --------------------------------------------------------------------------


def test_identical_files(pair, tmp_path):
    root, a, _ = pair
    copy = tmp_path / "copy.pt"
    shutil.copyfile(root / "a.pt", copy)
    r = diff(root / "a.pt", copy)
    assert r.identical_files and r.identical_tensors
    assert r.changed == [] and r.added == [] and r.removed == [] and r.n_unchanged == len(a)
    assert r.n_died == r.n_revived == 0 and all(layer.status == "unchanged" for layer in r.bn_layers)
    assert r.summary_line().startswith("identical files; 0 changed, 0 added, 0 removed")
    assert r.to_frame().empty


def test_other_formats_of_the_same_weights(pair, tmp_path):
    """torch zip vs safetensors, and a `module.`-prefixed nested save: no value changes."""
    root, a, _ = pair
    st = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in a.items()}, str(st))
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "model": {"module." + k: v for k, v in a.items()}}, nested)
    for other in (st, nested):
        r = diff(root / "a.pt", other)
        assert not r.identical_files
        assert r.changed == [] and r.added == [] and r.removed == [], other
        assert r.n_died == r.n_revived == 0 and r.n_dead_before == r.n_dead_after == 6
    assert diff(st, root / "a.pt").b.format == "torch-zip"


def test_atol(tmp_path):
    x = torch.linspace(-1, 1, 50, dtype=torch.float64)
    torch.save({"w": x}, tmp_path / "a.pt")
    torch.save({"w": x + 1e-9}, tmp_path / "b.pt")
    exact = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert [c.name for c in exact.changed] == ["w"] and exact.changed[0].n_changed_elements == 50
    loose = diff(tmp_path / "a.pt", tmp_path / "b.pt", atol=1e-6)
    assert loose.changed == [] and loose.n_unchanged == 1
    with pytest.raises(UsageError, match=r"^--atol must be >= 0, got -1\.0$"):
        diff(tmp_path / "a.pt", tmp_path / "b.pt", atol=-1)


def test_nonfinite_results_are_json_null(tmp_path):
    torch.save({"zero": torch.zeros(4), "nan": torch.ones(4)}, tmp_path / "a.pt")
    torch.save({"zero": torch.tensor([0.0, 2.0, 0.0, 0.0]), "nan": torch.tensor([1.0, float("nan"), 1.0, 1.0])},
               tmp_path / "b.pt")
    r = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    by = {c.name: c for c in r.changed}
    assert by["zero"].rel_change == math.inf and by["zero"].max_abs_diff == 2.0
    assert math.isnan(by["nan"].rel_change) and math.isnan(by["nan"].max_abs_diff)
    text = json.dumps(r.to_dict(), allow_nan=False)
    report = strict_json(text)
    rows = {c["name"]: c for c in report["changed"]}
    assert rows["zero"]["rel_change"] is None and rows["nan"]["rel_change"] is None  # JSON null (schema 1.1)
    assert "NaN" not in text and "Infinity" not in text


# ---- element-wise comparison --------------------------------------------------------------------


def test_bitwise_signed_zero_and_nan_payloads():
    a = torch.tensor([0.0, 1.0, float("nan"), 3.0])
    b = torch.tensor([-0.0, 1.0, float("nan"), 3.0])
    bits = b.view(torch.int32).clone()
    bits[2] = bits[2] | 1  # another NaN payload: still NaN at the same place, so equal
    b = bits.view(torch.float32)
    assert torch.isnan(b[2]) and not torch.equal(a.view(torch.int32), b.view(torch.int32))
    cmp = compare_values(a, b)
    assert cmp.n_changed == 1  # -0.0 vs +0.0 differs bitwise ...
    assert cmp.max_abs_diff == 0.0 and cmp.rel_change == 0.0  # ... but not in value
    finite = compare_values(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]))  # no NaN in the chunk
    assert (finite.n_changed, finite.max_abs_diff, finite.rel_change) == (1, 0.0, 0.0)
    assert compare_values(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), atol=1e-12).n_changed == 0
    same_inf = compare_values(torch.tensor([math.inf, -math.inf]), torch.tensor([math.inf, -math.inf]))
    assert same_inf.n_changed == 0


def test_chunked_rows_match_numpy(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 3, 3, 3, generator=gen)
    b = a.clone()
    b[[0, 5, 15]] += torch.randn(3, 3, 3, 3, generator=gen)
    b[9, 2, 1, 1] = a[9, 2, 1, 1] + 1e-3
    expected_rel = float(np.linalg.norm(_np(b) - _np(a)) / np.linalg.norm(_np(a)))
    for chunk in (7, 27, 100, 1 << 22):  # smaller than a row, one row, several rows, everything
        monkeypatch.setattr(diff_module, "_CHUNK", chunk)
        cmp = compare_values(a, b, channels=16)
        assert list(np.flatnonzero(cmp.channel_changed)) == [0, 5, 9, 15], chunk
        assert cmp.rel_change == pytest.approx(expected_rel, rel=1e-12), chunk
        assert cmp.max_abs_diff == pytest.approx(float(np.abs(_np(b) - _np(a)).max()), rel=1e-12)
        assert cmp.n_changed == 3 * 27 + 1
    # the first difference comes late: the identical chunks before it still count in ||a||
    c = a.clone()
    c[15, 2, 2, 2] += 1.0
    monkeypatch.setattr(diff_module, "_CHUNK", 27)
    late = compare_values(a, c, channels=16)
    assert late.rel_change == pytest.approx(1.0 / float(np.linalg.norm(_np(a))), rel=1e-12)
    monkeypatch.setattr(diff_module, "_CHUNK", 10)
    flat = compare_values(a.reshape(-1), c.reshape(-1))
    assert flat.channel_changed is None and flat.rel_change == pytest.approx(late.rel_change, rel=1e-12)


def test_dtype_change_and_complex():
    a = torch.tensor([1.0, 2.5, -3.0], dtype=torch.float32)
    same = compare_values(a, a.to(torch.float64))
    assert same.n_changed == 0 and same.rel_change == 0.0
    half = compare_values(torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float16))
    assert half.n_changed == 1 and half.max_abs_diff == pytest.approx(abs(float(np.float16(0.1)) - 0.1))
    z = torch.tensor([1 + 1j, 2 - 1j], dtype=torch.complex64)
    w = z.clone()
    w[1] = 2 + 1j
    cz = compare_values(z, w)
    assert cz.n_changed == 1 and cz.max_abs_diff == pytest.approx(2.0)
    assert cz.rel_change == pytest.approx(2.0 / math.sqrt(2 + 5))


# ---- terminal -----------------------------------------------------------------------------------


def _render(result, **kw) -> str:
    console = Console(record=True, width=220, color_system=None)
    render_diff(result, console, **kw)
    return console.export_text()


def test_render(result):
    text = _render(result)
    lines = text.splitlines()
    modalities = rows_by(text, "modality")
    assert {m: (r["dead A -> B"], r["died"], r["revived"]) for m, r in modalities.items()} == {
        "audio": ("4 -> 3", "1", "2"), "visual": ("2 -> 5", "3", "-"), "other": ("0 -> 0", "-", "-")}
    layers = rows_by(text, "layer")
    assert (layers["audio_net.layer1.0.bn1"]["died"], layers["audio_net.layer1.0.bn1"]["revived"]) == (
        "1 [1]", "2 [3, 7]")
    assert (layers["visual_net.layer3.0.bn1"]["died"], layers["visual_net.layer3.0.bn1"]["revived"]) == (
        "3 [4, 20, 31]", "-")
    tensors = rows_by(text, "tensor")
    assert set(tensors) == EXPECTED_CHANGED
    assert tensors["fusion_module.fc_out.weight"]["shape / dtype"] == "(6, 128) -> (7, 128)"
    assert "added (1): fusion_module.extra_scale" in lines
    assert "removed (1): visual_net.bn1.num_batches_tracked" in lines
    assert "visual_net.layer2.1.bn1" not in text  # unchanged layers are not listed
    assert text.rstrip().endswith(result.summary_line())
    top = _render(result, top=3)
    assert re.search(r"\(top 3 of 10\b", top) and len(rows_by(top, "tensor")) == 3
    assert _render(result, quiet=True) == result.summary_line() + "\n"

"""``--float64``: the model and the measurements in double precision, the reference that tells float32
rounding (a cosine or a fire rate that moves between devices) from a real effect.

The conflict cosines are checked against the independent float64 loop (tests/helpers/
conflict_reference.py) on the checkpoint's own model; the probe's figures against the float32 run;
contradicting options and models that cannot run in float64 are one-line errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avdiag import DataSource, inspect
from avdiag.data import make_loader, open_dataset
from avdiag.models.parts import av_parts
from avdiag.workflows.subject import Subject
from helpers.conflict_reference import ref_batch_cos, ref_cosines

SPEC = "synthetic:n=10,classes=4,audio=0.9,visual=0.3,seed=2,f=16,t=12,size=16,frames=2"
DATA = ("--data", SPEC, "--device", "cpu", "--batch-size", "5")


@pytest.fixture
def checkpoint(av_checkpoint):
    return av_checkpoint("model.pt", n_classes=4, width=4, realistic=True).path


def test_the_loader_gives_float64_modalities_and_integer_labels():
    batch = next(iter(make_loader(open_dataset(SPEC), batch_size=5, dtype=torch.float64)))
    assert batch["audio"].dtype == batch["visual"].dtype == torch.float64
    assert batch["label"].dtype == batch["index"].dtype == torch.long
    plain = next(iter(make_loader(open_dataset(SPEC), batch_size=5)))
    assert plain["audio"].dtype == torch.float32
    assert torch.equal(batch["audio"], plain["audio"].double())


def test_conflict_in_float64_equals_the_float64_loop_on_the_checkpoints_model(checkpoint, cli):
    report = cli("conflict", checkpoint, *DATA, "--float64", "--json", "-", "-q").json()
    assert report["options"]["float64"] is True

    parts = av_parts(Subject.open(checkpoint).model().module.double())
    batches = list(make_loader(open_dataset(SPEC), batch_size=5, dtype=torch.float64))
    want = {int(i): r for b in batches for i, r in zip(b["index"], ref_cosines(parts, b))}
    samples = report["conflict"]["samples"]
    assert sorted(s["index"] for s in samples) == sorted(want)
    for s in samples:
        assert abs(s["cos_audio"] - want[s["index"]][0]) <= 1e-10
        assert abs(s["cos_visual"] - want[s["index"]][1]) <= 1e-10
    for rec, batch in zip(report["conflict"]["batches"], batches):
        ref = ref_batch_cos(parts, batch)
        assert all(abs(rec["modalities"][m]["cos"] - ref[m]) <= 1e-10 for m in ("audio", "visual"))

    single = cli("conflict", checkpoint, *DATA, "--json", "-", "-q").json()
    assert single["options"]["float64"] is False
    by_index = {s["index"]: s for s in single["conflict"]["samples"]}
    gaps = [abs(s[k] - by_index[s["index"]][k]) for s in samples for k in ("cos_audio", "cos_visual")]
    assert 0 < max(gaps) <= 1e-4  # float32 rounding: present, and small at this size


def test_inspect_in_float64_runs_the_model_and_the_batches_in_float64(checkpoint):
    subject = Subject.open(checkpoint)
    data = DataSource(SPEC, device="cpu", batch_size=5, float64=True)
    result = inspect(subject, data=data)
    assert result.probe.to_dict()["float64"] is True
    assert {p.dtype for p in subject.model_for(data).module.parameters()} == {torch.float64}
    assert next(iter(data.loader()))["visual"].dtype == torch.float64
    assert {p.dtype for p in subject.model().module.parameters()} == {torch.float32}  # the float32 model kept

    plain = inspect(Subject.open(checkpoint), data=DataSource(SPEC, device="cpu", batch_size=5))
    assert plain.probe.to_dict()["float64"] is False
    for name, layer in result.measured.items():
        other = plain.measured[name]
        positions = layer.activity.positions
        flipped = abs(layer.activity.fire_rate - other.activity.fire_rate) * positions
        assert flipped.max() <= 1 + 1e-9, name  # at most a position within rounding of zero


@pytest.mark.parametrize("other", ["--amp", "--tf32"])
def test_float64_with_amp_or_tf32_is_a_one_line_error(checkpoint, cli, other):
    cli("inspect", checkpoint, *DATA, "--float64", other).error("--float64", other, "choose one")


def test_reinit_refuses_float64(checkpoint, cli, tmp_path):
    out = tmp_path / "out.pt"
    cli("reinit", checkpoint, "-o", out, "--method", "recalibrate", *DATA, "--float64").error(
        "--float64", "inspect, conflict, check")
    assert not out.exists()


class _Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(image)))


def test_an_exported_program_cannot_run_in_float64(tmp_path, cli):
    path = tmp_path / "image.pt2"
    torch.export.save(torch.export.export(_Image().eval(), (torch.randn(2, 3, 16, 16),)), path)
    spec = "synthetic:n=4,classes=2,size=16,frames=1"
    cli("inspect", path, "--data", spec, "--device", "cpu", "--batch-size", "2", "--float64").error(
        "--float64", "exported program")


def test_the_sketch_runs_in_float64(checkpoint, cli):
    report = cli("conflict", checkpoint, *DATA, "--float64", "--sketch", "64", "--json", "-", "-q").json()
    sketch = report["conflict"]["sketch"]
    assert sketch["dim"] == 64 and 0 <= sketch["max_abs_error"] < 1 and sketch["checked"] > 0


def test_a_model_that_makes_float32_tensors_of_its_own_says_so_under_float64(tmp_path, cli, monkeypatch):
    (tmp_path / "f32model.py").write_text('''
import torch
from torch import nn


class Mixer(nn.Module):
    visual_layout = "BCTHW"

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, image):
        y = torch.relu(self.bn(image))
        return y.flatten(1) @ torch.ones(y[0].numel(), 2)  # float32, whatever the input's dtype


def make():
    return Mixer()
''')
    monkeypatch.chdir(tmp_path)
    torch.save({"bn.weight": torch.ones(3), "bn.bias": torch.zeros(3), "bn.running_mean": torch.zeros(3),
                "bn.running_var": torch.ones(3), "bn.num_batches_tracked": torch.tensor(0)}, tmp_path / "m.pt")
    args = ("inspect", tmp_path / "m.pt", "--data", "synthetic:n=4,classes=2,size=8,frames=1", "--model",
            "f32model:make", "--device", "cpu", "--batch-size", "2")
    cli(*args).ok()
    cli(*args, "--float64").error("--float64", "float32 tensors of its own")


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta stands in for a GPU: the one-kernel L1 path
def test_dormant_sums_keep_float64_on_the_cpu_and_the_gpu_path(device):
    from avdiag.measure.dormant import _accumulate, _Site

    site = _Site("fc1", "mlp", "Linear", axis=1)
    for dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32)):
        site.pending = []
        _accumulate(site, torch.ones(4, 3, 5, dtype=dtype, device=device))
        assert site.pending[0].dtype == want and site.pending[0].shape == (3,)

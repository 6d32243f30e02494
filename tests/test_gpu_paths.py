"""The GPU paths' CPU-testable parts (issue 16): TF32 switches, the autocast dtype, non-finite BN
outputs as their own verdict, the probe's merged-once statistics, pinned-memory loaders, running out
of memory, the .pt2 device move, ABRi merge's batch move, and the GPU smoke script itself."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from avdiag import DataSource, inspect
from avdiag.data import make_loader, open_dataset
from avdiag.data.base import _FailedBatch
from avdiag.errors import ModelError
from avdiag.locate.resolve import is_out_of_memory, out_of_memory_as_error
from avdiag.measure import moments as moments_mod
from avdiag.measure import precision
from avdiag.measure.activity import approximate_verdicts, judge_activity
from avdiag.measure.moments import RunningMoments, Scratch
from avdiag.measure.probe import ChannelActivity, _Accumulator, _count_nonfinite
from avdiag.measure.thresholds import ProbeThresholds
from avdiag.rewrite.abri import batch_to, default_forward
from gpu_fixtures import ConvBN

SMOKE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_smoke.py"
IMAGES = "synthetic:n=8,classes=2,size=8"


# ---- TF32 ------------------------------------------------------------------------------------------


def _set_switches(values: dict) -> None:
    for name, (ns, attr, _) in precision._switches().items():
        setattr(ns, attr, values[name])


def test_full_fp32_turns_every_tf32_switch_off_and_restores_them():
    before = precision.tf32_settings()
    allowed = {name: ("tf32" if attr == "fp32_precision" else True)
               for name, (_, attr, _) in precision._switches().items()}
    full = {name: value for name, (_, _, value) in precision._switches().items()}
    try:
        _set_switches(allowed)
        with precision.full_fp32("cuda"):
            inside = precision.tf32_settings()
        after = precision.tf32_settings()
    finally:
        _set_switches(before)
    assert inside == full and after == allowed != full


def test_full_fp32_restores_after_an_exception_and_is_a_no_op_when_opted_out_or_on_cpu():
    before = precision.tf32_settings()
    with pytest.raises(ValueError), precision.full_fp32(torch.device("cuda", 0)):
        assert precision.tf32_settings() != before or all(v in ("ieee", False) for v in before.values())
        raise ValueError("boom")
    assert precision.tf32_settings() == before
    for ctx in (precision.full_fp32("cpu"), precision.full_fp32("cuda", enabled=False)):
        with ctx:
            assert precision.tf32_settings() == before


def test_measuring_combines_full_fp32_and_autocast(monkeypatch):
    calls = []
    real = precision.full_fp32

    def spy(device, *, enabled=True):
        calls.append((str(device), enabled))
        return real(device, enabled=enabled)

    monkeypatch.setattr(precision, "full_fp32", spy)
    with precision.measuring("cpu", amp=True, tf32=True):
        assert not torch.is_autocast_enabled("cpu")
    assert calls == [("cpu", False)]


# ---- the autocast dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize("supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_dtype_is_bfloat16_where_the_gpu_supports_it_else_float16(monkeypatch, supported, expected):
    monkeypatch.setattr(precision, "bf16_supported", lambda device=None: supported)
    assert precision.amp_dtype("cuda") == expected
    assert precision.amp_dtype_name("cuda:0", True) == str(expected).removeprefix("torch.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context is built, not entered
        assert precision.autocast(torch.device("cuda"), True).fast_dtype == expected


def test_amp_only_takes_effect_on_cuda():
    assert precision.amp_active("cuda", True) and not precision.amp_active("cuda", False)
    assert not precision.amp_active("cpu", True) and precision.amp_dtype_name("cpu", True) is None
    with precision.autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_support_is_false_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert precision.bf16_supported() is False


# ---- non-finite BN outputs ---------------------------------------------------------------------------


def _planted_conv_bn(tmp_path: Path) -> tuple[Path, ConvBN]:
    """Channel 1 outputs NaN everywhere (bias NaN); channel 2 overflows to +-inf where |x - mean| is
    above ~1.1 (gamma 3e38); channels 0 and 3 are ordinary."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.bias[1] = float("nan")
        model.bn.weight[2] = 3e38
    path = tmp_path / "conv_bn.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _bn_outputs(model: ConvBN, spec: str) -> torch.Tensor:
    images = [b["visual"][:, :, 0] for b in make_loader(open_dataset(spec), batch_size=4)]
    with torch.no_grad():
        return torch.cat([model.bn(model.conv(x)) for x in images])


def test_channels_with_inf_or_nan_outputs_are_their_own_verdict_never_dead(tmp_path):
    path, model = _planted_conv_bn(tmp_path)
    result = inspect(path, data=DataSource(IMAGES, model="gpu_fixtures:conv_bn", device="cpu", batch_size=4))

    layer = result.measured["bn"]
    out = _bn_outputs(model, IMAGES)
    expected = (~torch.isfinite(out)).sum(dim=(0, 2, 3)).numpy()
    assert 0 < expected[2] < out[:, 2].numel() and expected[1] == out[:, 1].numel()
    assert layer.nonfinite == [1, 2]
    np.testing.assert_array_equal(layer.activity.nonfinite, expected)
    assert layer.activity.nonfinite_rate[1] == 1.0
    assert not {1, 2} & (set(layer.dead) | set(layer.rarely_active) | set(layer.constant))
    d = layer.to_dict()
    assert d["measured_nonfinite_channels"] == [1, 2]
    assert d["nonfinite_rate"][1] == 1.0 and d["nonfinite_rate"][0] == 0.0
    assert math.isnan(layer.activity.std[1])  # reported, as null in JSON


def test_a_channel_of_nan_is_no_longer_called_dead(tmp_path):
    """What the fire rate alone says about a NaN channel (0: "never fires"), and what the verdict says."""
    path, _ = _planted_conv_bn(tmp_path)
    result = inspect(path, data=DataSource(IMAGES, model="gpu_fixtures:conv_bn", device="cpu", batch_size=4))
    activity = result.measured["bn"].activity
    assert activity.fire_rate[1] == 0.0
    assert 1 not in result.measured["bn"].dead


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_both_accumulator_paths_count_nonfinite_values_exactly(dtype):
    """The CPU path counts only for a batch whose row sums are not finite; the few-kernel (GPU) path
    counts finite values in every batch: both give every row's count."""
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 1, 7] = float("inf")
    x[2, 1, 0] = float("-inf")  # the row's shift itself
    x[1, 4, :] = float("nan")
    x[2, 3, 39] = float("nan")
    expected = (~torch.isfinite(x)).sum(dim=2).to(torch.int32)
    assert torch.equal(_count_nonfinite(x, x.float().sum(dim=2)), expected)
    clean = torch.randn(2, 3, 9)
    assert torch.equal(_count_nonfinite(clean, clean.sum(dim=2)), torch.zeros(2, 3, dtype=torch.int32))
    for scratch in (None, Scratch()):
        acc = _Accumulator(0.0, scratch)
        acc.add(x)
        np.testing.assert_array_equal(acc.result().nonfinite, expected.sum(dim=0).numpy())


def _activity(rate, std, peak, nonfinite, positions=100) -> ChannelActivity:
    arr = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    return ChannelActivity(arr(rate), arr([0.0] * len(rate)), arr(std), arr(peak), positions,
                           np.asarray(nonfinite, dtype=np.int64))


class _Static:
    """The part of a static LayerVerdicts judge_activity reads."""

    def __init__(self, feeds: str = "yes"):
        self.layer = type("Layer", (), {"feeds_activation": feeds})()
        self.dead: list[int] = []
        self.possibly_dead: list[int] = []


def test_judge_activity_keeps_nonfinite_channels_out_of_dead_rare_and_constant():
    activity = _activity(rate=[0.0, 0.0, 0.5, 0.02, 0.0005],
                         std=[0.5, float("nan"), 0.0, 0.3, 1e-5],
                         peak=[-1.0, float("nan"), 0.0005, 2.0, 0.0004],
                         nonfinite=[0, 100, 0, 3, 0])
    m = judge_activity(_Static(), activity, ProbeThresholds())
    assert m.nonfinite == [1, 3]
    assert m.dead == [0, 2, 4] and m.dead_by_std == [2]
    assert m.rarely_active == [] and m.constant == [2, 4]


def test_std_based_verdicts_are_marked_approximate_under_amp_only():
    plain = judge_activity(_Static(), _activity([0.0], [0.5], [-1.0], [0]), ProbeThresholds())
    by_std = judge_activity(_Static(), _activity([0.5], [0.0], [0.0005], [0]), ProbeThresholds())
    assert approximate_verdicts(False, [plain, by_std]) == []
    assert approximate_verdicts(True, [plain]) == ["measured_constant_channels"]
    assert approximate_verdicts(True, [plain, by_std]) == ["measured_constant_channels", "measured_dead_channels"]


# ---- the probe's statistics, merged once ------------------------------------------------------------


def _reference(batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fire rate, mean, population variance, max per channel, in float64 over every position."""
    flat = torch.cat([b.double().transpose(0, 1).reshape(b.shape[1], -1) for b in batches], dim=1)
    return ((flat > 0).double().mean(1).numpy(), flat.mean(1).numpy(), flat.var(1, correction=0).numpy(),
            flat.amax(1).numpy())


@pytest.mark.parametrize("scratch", [False, True], ids=["few-kernels", "cpu-scratch"])
@pytest.mark.parametrize("fold_elements", [1 << 18, 7])  # merged once at the end / after every batch
def test_accumulator_is_exact_across_batches_of_different_sizes(monkeypatch, fold_elements, scratch):
    monkeypatch.setattr(moments_mod, "FOLD_ELEMENTS", fold_elements)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(b, 4, h, w, generator=g) * 2 + 50 for b, h, w in ((3, 5, 7), (1, 5, 7), (2, 3, 3))]
    for b in batches:
        b[:, 2] = 7.25  # constant: exactly zero variance whatever the merge order
        b[:, 3] = b[:, 3] * 1e-3 + 1e4  # |mean| / std = 5e6: no loss to cancellation
    acc = _Accumulator(0.0, Scratch() if scratch else None)
    for b in batches:
        acc.add(b)
    got = acc.result()
    rate, mean, var, peak = _reference(batches)
    assert got.positions == sum(b.shape[0] * b.shape[2] * b.shape[3] for b in batches)
    np.testing.assert_allclose(got.fire_rate, rate, atol=0)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-7)  # float32 row sums
    np.testing.assert_allclose(got.std ** 2, var, rtol=1e-5)
    np.testing.assert_array_equal(got.max, peak)
    assert got.mean[2] == 7.25 and got.std[2] == 0.0
    assert not got.nonfinite.any()


@pytest.mark.parametrize("scratch", [False, True], ids=["few-kernels", "cpu-scratch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulator_takes_half_precision_outputs(dtype, scratch):
    x = (torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    acc = _Accumulator(0.0, Scratch() if scratch else None)
    acc.add(x)
    got = acc.result()
    rate, mean, var, peak = _reference([x])
    np.testing.assert_allclose(got.fire_rate, rate, atol=0)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.std ** 2, var, rtol=1e-5)
    np.testing.assert_array_equal(got.max, peak)


def test_running_moments_fold_after_enough_rows_on_a_gpu_and_every_batch_on_the_cpu(monkeypatch):
    """Off the CPU, row sums wait until FOLD_ELEMENTS are pending (fewer kernel launches); on the CPU they
    merge after every batch (small tensors kept between large activations fragment the heap)."""
    from avdiag.measure.moments import PendingRows

    monkeypatch.setattr(moments_mod, "FOLD_ELEMENTS", 10)
    device_rows = PendingRows(("a",))
    device_rows.add(4, a=torch.empty(2, 3, device="meta"))  # 6 row elements: kept
    assert not device_rows.full
    device_rows.add(4, a=torch.empty(2, 3, device="meta"))  # 12 >= 10: time to merge
    assert device_rows.full and device_rows.take()[4]["a"].shape == (4, 3) and device_rows.elements == 0
    rm = RunningMoments()
    x = torch.randn(2, 3, 4)
    rm.add(x)
    assert rm._pending.elements == 0 and rm.n == 8  # merged at once on the CPU
    rm.add(x)
    assert rm.n == 16
    np.testing.assert_allclose(rm.mean.numpy(), torch.cat([x, x]).double().mean(dim=(0, 2)).numpy(), atol=1e-6)


def test_probe_reports_its_precision_and_runs_the_bf16_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "bf16.pt"
    torch.save(ConvBN(torch.bfloat16).eval().state_dict(), path)
    result = inspect(path, data=DataSource(IMAGES, model="gpu_fixtures:conv_bn_bf16", device="cpu", batch_size=4,
                                           amp=True))
    assert result.probe.amp is False  # autocast is for CUDA only
    assert result.measured["bn"].activity.positions == 8 * 8 * 8
    assert result.measured["bn"].nonfinite == []


def test_probe_and_contribution_run_in_full_fp32_unless_opted_in(monkeypatch):
    from avdiag.measure import probe as probe_mod
    from avdiag.measure.contribution import passes

    seen = []

    def spy(device, *, enabled=True):
        seen.append(enabled)
        return precision.full_fp32(device, enabled=enabled)

    monkeypatch.setattr(probe_mod, "full_fp32", spy)
    monkeypatch.setattr(passes, "full_fp32", spy)
    resolved = type("R", (), {"to": lambda self, d: nn.Identity(), "name_prefix": "", "source": "test",
                              "__call__": lambda self, b: None})()
    batch = {"label": torch.zeros(2, dtype=torch.long), "x": torch.zeros(2, 3)}
    run = probe_mod.probe(resolved, [], [batch], torch.device("cpu"))
    probe_mod.probe(resolved, [], [batch], torch.device("cpu"), tf32=True)
    assert seen == [True, False]
    assert run.precision_dict() == {"amp": False, "amp_dtype": None, "tf32": False}

    from avdiag.measure.contribution import unimodal
    from avdiag.models import OGMGEClassifier
    from avdiag.models.parts import av_parts

    parts = av_parts(OGMGEClassifier(3, "concat", width=2))
    av = {"audio": torch.randn(2, 16, 16), "visual": torch.randn(2, 3, 1, 16, 16), "label": torch.tensor([0, 2])}
    unimodal.measure(parts, [av], "cpu")
    unimodal.measure(parts, [av], "cpu", tf32=True)
    assert seen == [True, False, True, False]


# ---- pinned memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("device, pinned", [("cuda", True), (torch.device("cuda", 0), True), ("cpu", False),
                                            (None, False)])
def test_loaders_pin_memory_only_for_a_cuda_device(device, pinned):
    loader = make_loader(open_dataset("synthetic:n=4,classes=2"), batch_size=2, device=device)
    assert loader.pin_memory is pinned


def test_a_failed_batch_keeps_its_message_through_the_pin_memory_step():
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = pin_memory(_FailedBatch("item 3: truncated wav"), "cuda")
    assert isinstance(pinned, _FailedBatch) and pinned.message == "item 3: truncated wav"


# ---- running out of memory ---------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "conv_bn.pt"
    torch.save(ConvBN().eval().state_dict(), path)
    return path


def test_gpu_out_of_memory_is_one_line_saying_what_to_reduce(tmp_path, cli):
    path = _checkpoint(tmp_path)
    cli("inspect", path, "--data", IMAGES, "--model", "gpu_fixtures:gpu_oom", "--device", "cpu",
        "--batch-size", "4").error("out of GPU memory", "--batch-size (now 4)", "--limit", "--device cpu")


def test_host_out_of_memory_is_one_line_too(tmp_path, cli):
    path = _checkpoint(tmp_path)
    message = cli("inspect", path, "--data", IMAGES, "--model", "gpu_fixtures:host_oom", "--device", "cpu",
                  "--batch-size", "2").error("out of host memory", "--batch-size (now 2)", "--limit")
    assert "--device cpu" not in message


def test_other_model_failures_keep_their_own_message(tmp_path, cli):
    path = _checkpoint(tmp_path)
    cli("inspect", path, "--data", IMAGES, "--model", "gpu_fixtures:shape_error", "--device", "cpu").error(
        "failed on a batch", "check --model")


def test_out_of_memory_recognition_and_the_guard():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(MemoryError())
    with pytest.raises(ModelError, match=r"out of GPU memory: reduce --batch-size or --limit"):
        with out_of_memory_as_error():
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(KeyError), out_of_memory_as_error():
        raise KeyError("not memory")


# ---- .pt2 programs move with the export device pass ---------------------------------------------------


class _BakedDevice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.bn(image) + torch.ones(image.shape[0], 3, 1, 1, device=image.device)


def test_an_exported_program_is_moved_with_its_baked_device_arguments(tmp_path):
    from avdiag.workflows.subject import Subject

    path = tmp_path / "baked.pt2"
    program = torch.export.export(_BakedDevice().eval(), (torch.randn(2, 3, 4, 4),))
    torch.export.save(program, path)
    resolved = Subject.open(path).model()
    assert resolved.program is not None
    same = resolved.to("cpu")
    assert same is resolved.module  # already there: not re-exported

    moved = resolved.to("meta")
    devices = [n.kwargs["device"] for n in moved.graph.nodes if "device" in n.kwargs]
    assert devices and all(torch.device(d).type == "meta" for d in devices)
    assert all(t.device.type == "meta" for t in moved.state_dict().values())
    assert resolved.module is moved


# ---- ABRi merge moves batches to the model ------------------------------------------------------------


def test_default_forward_moves_every_tensor_of_the_batch_to_the_models_device():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, batch):
            seen.append(batch)
            return batch

    Pair = namedtuple("Pair", "audio visual")
    default_forward(Probe(), {"x": torch.zeros(2), "pair": Pair(torch.zeros(1), [torch.ones(1)]), "n": 3})
    got = seen[0]
    assert got["x"].device.type == "meta" and got["n"] == 3
    assert isinstance(got["pair"], Pair) and got["pair"].audio.device.type == "meta"
    assert got["pair"].visual[0].device.type == "meta"
    assert batch_to(torch.zeros(1), torch.device("cpu")).device.type == "cpu"


# ---- the smoke script --------------------------------------------------------------------------------


def _smoke_module():
    """benchmarks/gpu_smoke.py as a module (benchmarks/ is not a package)."""
    if "gpu_smoke" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_smoke"] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return sys.modules["gpu_smoke"]


def test_smoke_script_without_cuda_says_it_needs_a_gpu_and_exits_zero(monkeypatch, capsys):
    smoke = _smoke_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_smoke_comparisons_fail_on_a_difference():
    smoke = _smoke_module()
    s = smoke.Smoke(smoke.make_config(smoke.parse_args(["--cpu-dry-run"]), Path(".")))
    base = {"conflict": {"batches": [{"first_index": 0, "modalities": {"audio": {"cos": 0.5}}}],
                         "samples": [{"index": 0, "cos_audio": 0.2, "cos_visual": -0.3},
                                     {"index": 1, "cos_audio": 0.1, "cos_visual": 0.4}]}}
    other = json.loads(json.dumps(base))
    other["conflict"]["samples"][1]["cos_visual"] = -0.4  # a flipped conflict flag
    smoke.compare_conflict(s, "conflict", "a vs b", base, other, 1e-4)
    by_name = {c.name: c for c in s.comparisons}
    assert by_name["a vs b: per-batch cos max |diff|"].passed
    assert not by_name["a vs b: per-sample cos max |diff|"].passed
    assert by_name["a vs b: per-sample cos <= 0 flags flipped (|cos| > 0.001)"].value == 1
    assert smoke.max_abs_diff([None, 1.0], [None, 1.0]) == 0.0
    assert smoke.max_abs_diff([None], [0.0]) == math.inf


def _named(smoke_run, prefix: str):
    found = [c for c in smoke_run.comparisons if c.name.startswith(prefix)]
    assert len(found) == 1, [c.name for c in smoke_run.comparisons]
    return found[0]


@pytest.mark.parametrize("gpu_error, passes", [(5e-5, True), (2e-4, False)])
def test_smoke_allows_the_gpu_ten_times_the_cpus_float32_rounding_and_no_more(gpu_error, passes):
    """Each device's float32 run against its own float64 run: the CPU's is 1e-5 here, so the GPU's may
    be 1e-4; float64 on both devices must agree."""
    smoke = _smoke_module()
    s = smoke.Smoke(smoke.make_config(smoke.parse_args(["--cpu-dry-run"]), Path(".")))
    exact = [0.5, -0.2, 0.3]

    def run(shift: float, *, first_only: bool = False):
        return {(i, "audio"): c + (shift if i == 0 or not first_only else 0.0) for i, c in enumerate(exact)}

    cos = {"cpu-float64": run(0), "cuda-float64": run(0), "cpu": run(1e-5), "cuda": run(gpu_error, first_only=True),
           "cuda-tf32": run(3e-3)}
    smoke._conflict_kind(s, "per-sample", cos)
    gate = _named(s, "float32 rounding on cuda: per-sample")
    assert gate.gating and gate.passed is passes and gate.tolerance == pytest.approx(1e-4)
    assert _named(s, "float64 cpu vs cuda: per-sample cos max").passed
    assert not _named(s, "cuda --tf32: per-sample").gating

    s = smoke.Smoke(s.config)
    smoke._conflict_kind(s, "per-sample", {**cos, "cuda-float64": run(1e-6)})
    assert not _named(s, "float64 cpu vs cuda: per-sample cos max").passed


def test_smoke_sets_verdicts_within_rounding_of_a_threshold_aside():
    smoke = _smoke_module()
    thresholds = {"dead_rate": 0.001, "constant_std": 0.001}

    def layer(rate: float, dead: list[int], positions: int = 1000) -> dict:
        return {"l": {"fire_rate": [rate, 0.5], "output_std": [1.0, 1.0], "output_max": [2.0, 2.0],
                      "positions_seen": positions, "measured_dead_channels": dead}}

    bands = smoke.Bands(std=1e-6, positions=2)
    # 1 of 1000 positions fires: a flip of one position decides the verdict
    assert smoke.verdict_diff(layer(0.001, [0]), layer(0.002, []), "measured_dead_channels", thresholds, bands)[::2] \
        == (0, 1)
    # never fires in 100,000 positions of the reference: a run calling it alive is wrong
    assert smoke.verdict_diff(layer(0.0, [0], 100_000), layer(0.01, [], 100_000), "measured_dead_channels",
                              thresholds, bands)[::2] == (1, 0)
    assert smoke.flipped_positions(layer(0.001, []), layer(0.004, [])) == (3.0, "l")


def test_smoke_summary_is_rewritten_after_every_step(tmp_path):
    """A run cut short by a time limit keeps the steps it finished, a failed one with its error."""
    smoke = _smoke_module()
    path = tmp_path / "summary.json"
    s = smoke.Smoke(smoke.make_config(smoke.parse_args(["--cpu-dry-run"]), tmp_path), path)
    with s.step("first"):
        s.compare("first", "a figure", 0.5, 1.0)
    assert json.loads(path.read_text())["n_comparisons"] == 1
    with s.step("second"):
        raise RuntimeError("the device went away")
    summary = json.loads(path.read_text())
    assert [st["name"] for st in summary["steps"]] == ["first", "second"]
    assert summary["steps"][1]["error"] == "RuntimeError: the device went away" and not summary["ok"]


def test_smoke_script_runs_everything_on_the_gpu_unless_dry():
    smoke = _smoke_module()
    gpu = smoke.make_config(smoke.parse_args([]), Path("."))
    dry = smoke.make_config(smoke.parse_args(["--cpu-dry-run"]), Path("."))
    assert (gpu.base, gpu.target, gpu.dry_run) == ("cpu", "cuda", False)
    assert (dry.base, dry.target, dry.dry_run) == ("cpu", "cpu", True) and dry.samples < gpu.samples
    for argv in smoke.bench_commands(gpu).values():
        assert argv[argv.index("--device") + 1] == "cuda"
    assert "probe_bench_amp" in smoke.bench_commands(gpu)


@pytest.mark.slow
def test_smoke_script_cpu_dry_run_writes_one_passing_summary(tmp_path):
    smoke = _smoke_module()
    summary_path = tmp_path / "summary.json"
    code = smoke.main(["--cpu-dry-run", "--no-bench", "--out", str(tmp_path / "runs"), "--json", str(summary_path)])
    summary = json.loads(summary_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert [s["error"] for s in summary["steps"]] == [None] * len(summary["steps"]), summary["steps"]
    assert code == 0 and summary["ok"] and summary["dry_run"]
    steps = {c["step"] for c in summary["comparisons"]}
    assert steps == {"inspect", "conflict", "reinit", "check", "torchrun"}
    assert all({"name", "value", "tolerance", "passed", "gating"} <= set(c) for c in summary["comparisons"])


def test_row_sums_in_a_shared_scratch_buffer_equal_fresh_ones():
    """The probe's CPU path reuses one buffer for every layer's shifted copy and fire mask: the sums are
    those of fresh temporaries, whatever shapes come through (growing and shrinking)."""
    from avdiag.measure.moments import Scratch, row_sums

    scratch = Scratch()
    for shape in [(2, 3, 50), (4, 8, 200), (1, 2, 7)]:
        x = torch.randn(*shape) * 10 + 100
        for got, want in zip(row_sums(x, scratch), row_sums(x)):
            assert torch.equal(got, want)
    assert scratch.buffers[(torch.float32, torch.device("cpu"))].numel() == 4 * 8 * 200

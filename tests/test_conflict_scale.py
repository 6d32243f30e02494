"""Per-sample conflict at scale: every per-layer method against a loop of batch-size-1 backward
passes, chunking under a memory budget, the timed choice and its report, the approximate (sketch)
mode and its stated error, streaming, progress, and torchrun with idle processes.

The reference (tests/helpers/conflict_reference.py) shares no code with the engine: per sample, one
forward through the model's parts, ``torch.autograd.grad`` of each loss over the encoder's
parameters, flattened cosines.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avdiag.data import make_loader, open_dataset
from avdiag.errors import ModelError, UsageError
from avdiag.measure.conflict import (
    DEFAULT_MAX_MEMORY, ConflictMeter, GradientConflict, measure_conflict, parse_memory,
)
from avdiag.measure.conflict.budget import ACTIVATION_SHARE
from avdiag.measure.conflict.layers import EXACT_METHODS, METHODS
from avdiag.measure.conflict.select import forget_choices
from avdiag.models import ConcatFusion, OGMGEClassifier
from avdiag.models.parts import AVParts, av_parts
from avdiag.workflows.conflict import conflict
from avdiag.workflows.datasource import DataSource
from helpers.conflict_reference import ref_batch_cos, ref_cosines

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6
SPEC = "synthetic:n=10,classes=5,audio=0.9,visual=0.3,seed=1,f=16,t=12,size=16,frames=2"


# ---- models: the built-in one, and one with modules only the generic methods handle ----------------


class OddEncoder(torch.nn.Module):
    """Conv (stride, bias), eval BatchNorm, GroupNorm, a grouped conv (generic methods only), a
    dilated 1x1 conv, and a Linear applied per frame (rows per sample = frames)."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, 4, 3, stride=2, padding=1, bias=True)
        self.bn = torch.nn.BatchNorm2d(4)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.grouped = torch.nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False)
        self.mix = torch.nn.Conv2d(6, 6, 1, bias=True)
        self.fc = torch.nn.Linear(6, 5)
        self.out_dim = 5
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            for p in (self.bn.weight, self.gn.weight):
                p.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)), inplace=True)
        return self.mix(F.relu(self.grouped(self.gn(x))))

    def pool(self, fmap, frames=None):
        z = self.fc(fmap.mean((2, 3)))
        return z.reshape(-1, frames, z.shape[1]).mean(1) if frames else z


class OddAV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_net, self.visual_net = OddEncoder(1), OddEncoder(3)
        self.fusion_module = ConcatFusion(5, 5)


def odd_parts(model: OddAV) -> AVParts:
    fc = model.fusion_module.fc_out

    def unimodal(a, v):
        return {"audio": a @ fc.weight[:, :5].t() + fc.bias / 2, "visual": v @ fc.weight[:, 5:].t() + fc.bias / 2}

    return AVParts(model, {"audio": model.audio_net, "visual": model.visual_net}, model.fusion_module,
                   model.fusion_module.forward, unimodal, "slice", ("audio", "visual"))


def built_in_parts(seed: int = 0) -> AVParts:
    torch.manual_seed(seed)
    return av_parts(OGMGEClassifier(5, "concat", width=4))


@pytest.fixture(scope="module")
def batches():
    return list(make_loader(open_dataset(SPEC), batch_size=5))


@pytest.fixture(scope="module")
def odd():
    torch.manual_seed(3)
    return odd_parts(OddAV())


def assert_matches_loop(result: GradientConflict, parts: AVParts, batches: list[dict], tol: float = TOL) -> None:
    ref = {int(i): r for b in batches for i, r in zip(b["index"], ref_cosines(parts, b))}
    assert sorted(ref) == [s.index for s in result.samples]
    for s in result.samples:
        want_a, want_v = ref[s.index]
        assert abs(s.cos_audio - want_a) <= tol, (s.index, s.cos_audio, want_a)
        assert abs(s.cos_visual - want_v) <= tol, (s.index, s.cos_visual, want_v)


# ---- every method the selector can pick --------------------------------------------------------------


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_every_layer_method_equals_the_loop(method, batches, odd):
    """Forcing one method wherever it applies (the others take the timed choice): per-sample cosines
    within 1e-6 of the loop, per-batch cosines within 1e-6 of the batch-mean gradients."""
    for parts in (built_in_parts(), odd):
        result = measure_conflict(parts, batches, "cpu", layer_method=method, memory_bytes=256 * 1024)
        assert_matches_loop(result, parts, batches)
        for rec, batch in zip(result.batches, batches):
            want = ref_batch_cos(parts, batch)
            for m in ("audio", "visual"):
                assert abs(rec.modalities[m].cos - want[m]) <= TOL
        applies = [name for name, mod in parts.model.named_modules()
                   if name.split(".")[0] in ("audio_net", "visual_net") and next(mod.parameters(recurse=False), None) is not None]
        used = result.engine.layers
        assert set(used) == set(applies)
        if method in ("vmap", "loop") or parts is odd and method in ("gram", "outer", "elementwise", "im2col"):
            assert method in used.values(), (method, used)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_every_layer_method_equals_the_loop_in_float64(method, batches):
    """In float64 (``--float64``) rounding no longer hides a wrong term: forcing each method, the
    per-sample cosines are within 1e-11 of the float64 loop and the per-batch ones of the float64
    batch gradients (float32 allows 1e-6)."""
    batches64 = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    torch.manual_seed(3)
    for parts in (built_in_parts(), odd_parts(OddAV())):
        parts.model.double()
        result = measure_conflict(parts, batches64, "cpu", layer_method=method, memory_bytes=256 * 1024)
        assert_matches_loop(result, parts, batches64, tol=1e-11)
        for rec, batch in zip(result.batches, batches64):
            want = ref_batch_cos(parts, batch)
            assert all(abs(rec.modalities[m].cos - want[m]) <= 1e-11 for m in ("audio", "visual"))


def _exact_products(a: torch.Tensor | None, b: torch.Tensor | None, p: torch.Tensor) -> list[float]:
    x = (torch.zeros_like(p) if a is None else a).double().reshape(-1)
    y = (torch.zeros_like(p) if b is None else b).double().reshape(-1)
    return [float(x @ y), float(x @ x), float(y @ y)]


@pytest.mark.parametrize("batched", [True, False])
def test_per_tensor_products_both_paths_equal_float64_sums(monkeypatch, batched):
    """The per-tensor path (rescaled float32) and the batched one (concatenated, float64, segmented
    sums: the GPU's, and the CPU's for small tensors) give every tensor's <a, b>, |a|^2, |b|^2,
    including gradients whose squares underflow float32, empty tensors and missing gradients."""
    from avdiag.measure.conflict import gradients

    monkeypatch.setattr(gradients, "PRODUCTS", "batched" if batched else "per-tensor")
    gen = torch.Generator().manual_seed(0)
    params = [torch.empty(5, 3), torch.empty(0), torch.empty(7), torch.empty(4, 2, 3, 3), torch.empty(3)]
    a = [torch.randn(p.shape, generator=gen) for p in params]
    b = [torch.randn(p.shape, generator=gen) for p in params]
    a[2], b[2] = a[2] * 1e-30, b[2] * 1e-25  # squares below float32's smallest subnormal
    b[4] = None
    got = gradients.tensor_products(a, b, params)
    assert got.dtype == torch.float64 and got.shape == (len(params), 3)
    for row, (x, y, p) in zip(got.tolist(), zip(a, b, params)):
        want = _exact_products(x, y, p)
        assert row == pytest.approx(want, rel=1e-6, abs=0)
    assert got[2, 1] > 0 and got[2, 2] > 0


def test_model_state_restores_every_buffer_after_a_train_mode_forward():
    from avdiag.measure.conflict.gradients import ModelState

    model = OGMGEClassifier(5, "concat", width=4).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ModelState(model, save_buffers=True):
        model.train()
        model(torch.randn(4, 16, 12), torch.randn(4, 3, 1, 16, 16))
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_generic_modules_get_a_generic_method_the_rest_a_specialised_one(batches, odd):
    forget_choices()
    result = measure_conflict(odd, batches, "cpu")
    layers = result.engine.layers
    for m in ("audio", "visual"):
        assert layers[f"{m}_net.gn"] in ("vmap", "loop") and layers[f"{m}_net.grouped"] in ("vmap", "loop")
        assert layers[f"{m}_net.bn"] == "elementwise" and layers[f"{m}_net.fc"] in ("outer", "gram")
        assert layers[f"{m}_net.conv1"] in ("im2col", "direct", "grouped", "gram")
    assert result.per_sample_method == "hooks"


def test_the_timed_choice_is_the_fastest_candidate(batches):
    """Candidates are timed on the first 8 samples of a chunk; the winner runs the rest."""
    forget_choices()
    parts = built_in_parts(seed=2)
    whole = [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}]  # one chunk of 10 samples
    result = measure_conflict(parts, whole, "cpu")
    assert result.engine.chunk_size == 10
    assert_matches_loop(result, parts, whole)
    want = ref_batch_cos(parts, whole[0])
    for m in ("audio", "visual"):
        assert abs(result.batches[0].modalities[m].cos - want[m]) <= TOL
    trials = result.engine.trials
    assert trials, "the first chunk times its candidates"
    for layer, times in trials.items():
        assert result.engine.layers[layer] == min(times, key=times.get)
        assert all(t > 0 for t in times.values())
    convs = [k for k in result.engine.layers if "conv" in k or "downsample.0" in k]
    assert "direct" in trials[convs[0]]  # the loop's own kernel is always a candidate on CPU
    again = measure_conflict(parts, whole, "cpu")  # remembered: no trial the second time
    assert again.engine.trials == {} and again.engine.layers == result.engine.layers


# ---- chunks and the memory budget ----------------------------------------------------------------------


def test_chunk_size_comes_from_the_measured_memory_of_a_sample(batches):
    parts = built_in_parts()
    big = measure_conflict(parts, batches, "cpu")
    per_sample = big.engine.per_sample_bytes
    assert per_sample > 0 and big.engine.chunk_size == 5 and big.engine.memory_budget == DEFAULT_MAX_MEMORY
    budget = int(2.5 * per_sample / ACTIVATION_SHARE)  # room for two samples' activations
    small = measure_conflict(parts, batches, "cpu", memory_bytes=budget)
    assert small.engine.chunk_size == 2 and small.engine.per_sample_bytes == per_sample
    one = measure_conflict(parts, batches, "cpu", memory_bytes=1)
    assert one.engine.chunk_size == 1
    for r in (small, one):  # the same figures whatever the chunking
        for a, b in zip(r.samples, big.samples):
            assert abs(a.cos_audio - b.cos_audio) <= TOL and abs(a.cos_visual - b.cos_visual) <= TOL
        for ra, rb in zip(r.batches, big.batches):
            for m in ("audio", "visual"):
                assert abs(ra.modalities[m].cos - rb.modalities[m].cos) <= TOL
                assert math.isclose(ra.modalities[m].norm_unimodal, rb.modalities[m].norm_unimodal, rel_tol=1e-5)
            assert math.isclose(ra.loss_multimodal, rb.loss_multimodal, rel_tol=1e-6)


def test_per_batch_only_and_train_mode_paths_are_chunked_too(batches):
    parts = built_in_parts(seed=4)
    whole = measure_conflict(parts, batches, "cpu", per_sample=False)
    chunked = measure_conflict(parts, batches, "cpu", per_sample=False, memory_bytes=1)
    for ra, rb, batch in zip(chunked.batches, whole.batches, batches):
        want = ref_batch_cos(parts, batch)
        for m in ("audio", "visual"):
            assert abs(ra.modalities[m].cos - want[m]) <= TOL and abs(rb.modalities[m].cos - want[m]) <= TOL
    train = measure_conflict(parts, batches, "cpu", train_mode=True, memory_bytes=1)
    assert_matches_loop(train, parts, batches)  # per-sample cosines stay eval-mode


def test_parse_memory():
    assert parse_memory("2G") == parse_memory("2GiB") == parse_memory("2gb") == 2 * 2**30
    assert parse_memory("512M") == 512 * 2**20 and parse_memory("1.5G") == int(1.5 * 2**30)
    assert parse_memory(3 * 2**20) == 3 * 2**20
    for bad in ("lots", "-1G", "2X", "", True, "100K"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_memory(bad)


def test_running_out_of_memory_is_one_line(batches, monkeypatch):
    from avdiag.measure.conflict import engine

    def exhausted(*_a, **_k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    monkeypatch.setattr(engine.Engine, "eval_batch", exhausted)
    with pytest.raises(ModelError, match=r"^out of host memory .* budget of 2\.0 GiB: lower --max-memory$"):
        measure_conflict(built_in_parts(), batches, "cpu")


# ---- the approximate mode ------------------------------------------------------------------------------


def test_sketch_is_close_states_its_error_and_is_never_called_exact(batches):
    parts = built_in_parts(seed=5)
    exact = {s.index: s for s in measure_conflict(parts, batches, "cpu").samples}
    result = measure_conflict(parts, batches, "cpu", sketch=64, sketch_seed=3)
    assert result.per_sample_method == "sketch"
    doc = result.to_dict()
    assert doc["per_sample_exact"] is False and doc["sketch"]["dim"] == 64 and doc["sketch"]["seed"] == 3
    errors = [abs(s.cos(m) - exact[s.index].cos(m)) for s in result.samples for m in ("audio", "visual")]
    assert max(errors) < 0.2 and sum(errors) / len(errors) < 0.05
    # the stated error is that of the first samples (whole chunks, at least 8), against the exact engine
    checked = result.sketch.checked
    assert checked >= 16 and checked % 2 == 0
    first = errors[:checked]
    assert math.isclose(result.sketch.max_abs_error, max(first), abs_tol=TOL)
    assert math.isclose(result.sketch.mean_abs_error, sum(first) / len(first), abs_tol=TOL)
    assert measure_conflict(parts, batches, "cpu").to_dict()["per_sample_exact"] is True


def test_sketch_error_shrinks_with_its_size_and_vanishes_when_nothing_is_projected(batches):
    parts = built_in_parts(seed=6)
    exact = measure_conflict(parts, batches, "cpu").samples

    def mean_error(dim: int, seed: int) -> float:
        got = measure_conflict(parts, batches, "cpu", sketch=dim, sketch_seed=seed).samples
        return sum(abs(a.cos(m) - b.cos(m)) for a, b in zip(got, exact) for m in ("audio", "visual")) / (2 * len(got))

    small = sum(mean_error(4, seed) for seed in range(3)) / 3
    large = sum(mean_error(256, seed) for seed in range(3)) / 3
    assert large < small / 2, (small, large)
    whole = measure_conflict(parts, batches, "cpu", sketch=10**6)  # every side kept whole: exact
    for a, b in zip(whole.samples, exact):
        assert abs(a.cos_audio - b.cos_audio) <= TOL and abs(a.cos_visual - b.cos_visual) <= TOL
    assert whole.sketch.max_abs_error <= TOL


def test_sketch_and_exact_shards_do_not_combine(batches):
    parts = built_in_parts()
    a = measure_conflict(parts, batches[:1], "cpu")
    b = measure_conflict(parts, batches[1:], "cpu", sketch=16)
    with pytest.raises(ValueError, match="sketched"):
        GradientConflict.combine([a, b])


# ---- streaming ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", [False, True])
def test_the_meter_streams_and_survives_an_inference_pass(train_mode, batches):
    parts = built_in_parts(seed=7)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    whole = measure_conflict(parts, batches, "cpu", train_mode=train_mode)
    meter = ConflictMeter(parts, "cpu", train_mode=train_mode)
    parts.model.train()
    with torch.inference_mode():  # as when a contribution pass pulls the batches
        for batch in batches:
            made_here = {k: v.clone() for k, v in batch.items()}
            assert made_here["audio"].is_inference()
            assert meter.add(made_here) == len(batch["label"])
            assert parts.model.training  # the caller's flags are back after every batch
    streamed = meter.result()
    assert streamed.to_dict()["samples"] == whole.to_dict()["samples"]
    assert streamed.to_dict()["modalities"] == whole.to_dict()["modalities"]
    assert all(torch.equal(v, before[k]) for k, v in parts.model.state_dict().items())  # buffers restored


def test_workflow_streams_with_progress_and_reports_the_engine(tmp_path, av_checkpoint):
    ckpt = av_checkpoint("ogm.pt", "ogm-ge", n_classes=4).path
    calls: list[tuple[str, int, list[int]]] = []

    def progress(total, label):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            steps: list[int] = []
            calls.append((label, total, steps))
            yield steps.append

        return bar()

    data = DataSource("synthetic:n=10,classes=4", batch_size=4, device="cpu")
    result = conflict(ckpt, data, progress=progress, max_memory="64M", sketch=None)
    assert [(label, total) for label, total, _ in calls] == [("conflict", 10), ("held-out", 10)]
    assert calls[0][2] == [4, 4, 2]  # samples measured, batch by batch
    doc = result.to_dict()
    assert doc["options"]["max_memory"] == 64 * 2**20 and doc["options"]["sketch"] is None
    engine = doc["conflict"]["engine"]
    assert engine["memory_budget"] == 64 * 2**20 and engine["per_sample"] == {"audio": "hooks", "visual": "hooks"}
    assert set(engine["layers"].values()) <= set(METHODS)
    sketched = conflict(ckpt, data, sketch=32)
    assert "approximate (sketch 32 per layer" in sketched.summary_line()
    assert sketched.to_dict()["conflict"]["per_sample_exact"] is False
    with pytest.raises(UsageError, match="--sketch"):
        conflict(ckpt, data, sketch=0)
    with pytest.raises(UsageError, match="--max-memory"):
        conflict(ckpt, data, max_memory="a lot")


# ---- torchrun: more processes than batches, odd numbers of batches ------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed next to this Python")
@pytest.mark.parametrize("n", [4, 12])  # batches of 4: one batch per split, then three
def test_torchrun_with_idle_or_uneven_processes_equals_one_process(n, tmp_path, av_checkpoint):
    path = av_checkpoint("ogm.pt", "ogm-ge", n_classes=4).path
    args = ["conflict", str(path), "--data", f"synthetic:n={n},classes=4", "--batch-size", "4", "--device", "cpu",
            "-q", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "avdiag", *args, str(one)], check=True, env=env, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "avdiag", *args, str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for m in ("audio", "visual"):
        ca, cb = a["modalities"][m]["conflict"], b["modalities"][m]["conflict"]
        assert ca["batches"] == cb["batches"] == n // 4
        assert ca["cos_per_batch"] == pytest.approx(cb["cos_per_batch"], abs=1e-6)
        assert ca["samples"] == cb["samples"] == n
        assert ca["sample_cos_mean"] == pytest.approx(cb["sample_cos_mean"], abs=1e-6)
        sa, sb = a["modalities"][m]["contribution"], b["modalities"][m]["contribution"]
        assert sa["shapley_mean"]["probability"] == pytest.approx(sb["shapley_mean"]["probability"], abs=1e-6)
        assert sa["unimodal_accuracy"] == sb["unimodal_accuracy"]
    assert a["contribution"]["learning_state"] == b["contribution"]["learning_state"]
    assert a["contribution"]["learning_state"]["audio"]["n_heldout"] == n


# ---- GPU (skipped without one) ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu_and_amp_stays_close(batches, odd):
    for parts in (built_in_parts(seed=8), odd):
        cpu = measure_conflict(parts, batches, "cpu")
        gpu = measure_conflict(parts, batches, "cuda")
        amp = measure_conflict(parts, batches, "cuda", amp=True)
        assert amp.engine.amp in ("bfloat16", "float16") and gpu.engine.amp is None
        for a, b, c in zip(cpu.samples, gpu.samples, amp.samples):
            for m in ("audio", "visual"):
                assert abs(a.cos(m) - b.cos(m)) <= 1e-5 and abs(a.cos(m) - c.cos(m)) <= 0.05
        parts.model.cpu()


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_stays_off_unless_asked(tf32, batches, monkeypatch):
    """The gradient passes run in full float32 (TF32 disabled) unless the caller opts in."""
    from contextlib import nullcontext

    from avdiag.measure.conflict import mmpareto

    seen: list[bool] = []
    monkeypatch.setattr(mmpareto, "full_fp32", lambda device, enabled=True: seen.append(enabled) or nullcontext())
    measure_conflict(built_in_parts(), batches[:1], "cpu", per_sample=False, tf32=tf32)
    assert seen == [not tf32]


def test_the_default_budget_is_2g_on_a_cpu_and_half_the_free_memory_of_a_gpu(monkeypatch):
    from avdiag.measure.conflict.budget import DEFAULT_MAX_MEMORY, default_budget

    assert default_budget("cpu") == DEFAULT_MAX_MEMORY == 2 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 141 * 2**30))
    assert default_budget("cuda") == 50 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 8 * 2**30))
    assert default_budget("cuda:0") == DEFAULT_MAX_MEMORY  # never below the CPU default

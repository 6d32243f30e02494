"""`avdiag reinit` end to end: ABRi fold and module mode, resets, Diagnosing & Re-learning, BN
recalibration, and the safety of the rewrite (input untouched, atomic writes, verification, CLI errors).

Every expectation is recomputed here from the input tensors and the formulas of the methods
(Feng, Xia, Hu 2023 for ABRi; Wei, Li, Feng, Hu 2024 for re-learning), not read back from avdiag:

* ABRi fold on flagged channels: ``gamma' = a*gamma + (1-a)``, ``beta' = a*beta`` (float64, cast
  back), running statistics ``(a*m, a*v + (1-a))`` (blend) or ``(0, 1)`` (reset);
* relearn: cluster purity of pooled encoder features (our own forward pass, scaling, k-means call
  and purity count), ``alpha = tanh(lam * |P_train - P_heldout|)``, and
  ``theta' = alpha*theta_init + (1-alpha)*theta`` on conv weights and BN gamma/beta only;
* recalibration: torch's own BatchNorm in training mode with a cumulative average (momentum None).

Models are the built-in width-8 ones; data is the tiny seeded synthetic set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from torch import nn

import avdiag
import avdiag.load.write as write_module
from avdiag.data import open_dataset
from avdiag.errors import UsageError, VerificationError
from avdiag.models import MMParetoClassifier, OGMGEClassifier
from avdiag.rewrite import abri, methods
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.inspect import inspect
from avdiag.workflows.reinit import (
    AbriOptions,
    RecalibrateOptions,
    ReinitOptions,
    RelearnOptions,
    ResetOptions,
    reinit,
)
from layout_fixtures import N_CLASSES, WIDTH

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ogm_ge_planted.pt"
PLANTED = json.loads((ROOT / "examples" / "ogm_ge_planted.expected.json").read_text())
SYNTHETIC = "synthetic:n=48,classes=4,audio=0.9,visual=0.3,seed=1"
SYNTHETIC_CLASSES = 4
BATCH = 16
ROLES = ("weight", "bias", "running_mean", "running_var")
OLD_MTIME_NS = 1_600_000_000_000_000_000  # 2020-09-13: any write would move it


# --- helpers ------------------------------------------------------------------------------------


def _example_copy(folder: Path, name: str = "best_model.pth") -> Path:
    """A private copy of the bundled example with an old, known mtime."""
    path = folder / name
    shutil.copyfile(EXAMPLE, path)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return path


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def _strip(sd: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in sd), "every key keeps the DataParallel prefix"
    return {k[len(prefix):]: v for k, v in sd.items()}


def _raw(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    t = t.detach().contiguous()
    return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_bits(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, and every tensor equal byte for byte (dtype and shape included)."""
    assert sorted(actual) == sorted(expected)
    wrong = [n for n in expected if _raw(actual[n]) != _raw(expected[n])]
    assert not wrong, f"{len(wrong)} tensor(s) differ from the expectation, e.g. {wrong[:5]}"


def _assert_same_tree(a, b, where: str = "") -> None:
    """Plain data and tensors, recursively equal (tensors byte for byte)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and _raw(a) == _raw(b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _bn_layers(model: nn.Module, prefix: str = "") -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith(prefix)]


def _example_scope() -> dict[str, list[int]]:
    """Planted layer -> planted channels (negative-bias dead and abnormal pairs) of the example."""
    scope: dict[str, set[int]] = {}
    for plan in PLANTED.values():
        for layer, channels in plan.items():
            scope.setdefault(layer, set()).update(channels)
    return {layer: sorted(c) for layer, c in scope.items()}


def _example_dead() -> dict[str, list[int]]:
    """The planted channels that are dead: every negative-bias channel, and abnormal pairs in a BN that
    feeds a ReLU directly (``bn1``); the abnormal pair in ``layer4.1.bn2`` feeds the residual add."""
    dead = {layer: list(c) for layer, c in PLANTED["negative_bias"].items()}
    for layer, channels in PLANTED["abnormal_pair"].items():
        if layer.endswith(".bn1"):
            dead[layer] = sorted(set(dead.get(layer, [])) | set(channels))
    return dead


def _folded(sd: dict[str, torch.Tensor], scope: dict[str, list[int] | None], alpha: float,
            stats: str | None) -> dict[str, torch.Tensor]:
    """The whole state dict after an ABRi fold, written from the formulas (float64, cast back)."""
    out = dict(sd)

    def put(name: str, value) -> None:
        old = sd[name]
        new = old.double().clone()
        rows = slice(None) if channels is None else torch.tensor(channels, dtype=torch.long)
        new[rows] = value(new[rows])
        out[name] = new.to(old.dtype)

    for layer, channels in scope.items():
        put(f"{layer}.weight", lambda g: alpha * g + (1 - alpha))
        put(f"{layer}.bias", lambda b: alpha * b)
        if stats == "blend":
            put(f"{layer}.running_mean", lambda m: alpha * m)
            put(f"{layer}.running_var", lambda v: alpha * v + (1 - alpha))
        elif stats == "reset":
            put(f"{layer}.running_mean", lambda m: torch.zeros_like(m))
            put(f"{layer}.running_var", lambda v: torch.ones_like(v))
    return out


def _dead_counts(path: Path) -> dict[str, int]:
    return {name: m.n_dead for name, m in inspect(path).modalities.items()}


def _assert_clean(path: Path) -> None:
    result = inspect(path)
    assert {n: (m.n_dead, m.n_abnormal) for n, m in result.modalities.items()} == {
        "audio": (0, 0), "visual": (0, 0)}
    assert all(not v.dead and not v.abnormal for v in result.layers)


def _batches(split: str) -> list[dict[str, torch.Tensor]]:
    """The synthetic split in order, stacked by hand into batches of BATCH items."""
    dataset = open_dataset(SYNTHETIC, split=split)
    out = []
    for start in range(0, len(dataset), BATCH):
        items = [dataset[i] for i in range(start, min(start + BATCH, len(dataset)))]
        out.append({"audio": torch.stack([it["audio"] for it in items]),
                    "visual": torch.stack([it["visual"] for it in items]),
                    "label": torch.tensor([it["label"] for it in items])})
    return out


def _data(batch_size: int = BATCH) -> DataSource:
    return DataSource(SYNTHETIC, device="cpu", batch_size=batch_size)


def _ogm(sd: dict[str, torch.Tensor] | None = None) -> OGMGEClassifier:
    model = OGMGEClassifier(6, fusion="concat", width=WIDTH)
    if sd is not None:
        model.load_state_dict(sd, strict=True)
    return model.eval()


# --- 1. ABRi fold --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fold")
    src = _example_copy(folder)
    before = _fingerprint(src)
    out = folder / "abri.pth"
    result = reinit(src, out)
    assert _fingerprint(src) == before
    return src, out, result


def test_fold_revives_every_planted_channel(fold):
    src, out, result = fold
    located = {v.layer.name: sorted(set(v.dead) | set(v.abnormal)) for v in inspect(src).layers
               if v.dead or v.abnormal}
    assert located == _example_scope()
    _assert_clean(out)
    assert result.dead_before == _dead_counts(src) == {"audio": 17, "visual": 5}
    assert result.dead_after == _dead_counts(out) == {"audio": 0, "visual": 0}


def test_fold_values_and_untouched_tensors(fold):
    src, out, result = fold
    before, after = _load(src), _load(out)
    sd = _strip(before["model"])
    _assert_bits(_strip(after["model"]), _folded(sd, _example_scope(), 0.5, "blend"))
    rewritten = {f"{layer}.{role}" for layer in _example_scope() for role in ROLES}
    assert {c.name for c in result.changes} == rewritten
    for change in result.changes:
        layer = change.name.rsplit(".", 1)[0]
        assert change.channels_changed == len(_example_scope()[layer]), change.name
    assert result.verification["identical"] == len(sd) - len(rewritten)


def test_fold_loads_strictly_into_the_builtin_model(fold):
    _, out, _ = fold
    model = _ogm(_strip(_load(out)["model"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        outputs = model(torch.randn(2, 1, 64, 48, generator=g), torch.randn(2, 3, 2, 32, 32, generator=g))
    assert all(bool(torch.isfinite(t).all()) for t in outputs)


def test_fold_keeps_nesting_and_records_provenance(fold):
    src, out, result = fold
    before, after = _load(src), _load(out)
    assert list(after) == list(before) + ["avdiag_provenance"]
    for key in before:
        if key != "model":
            _assert_same_tree(before[key], after[key], key)  # optimizer, scheduler, epoch ... kept as they were
    assert sorted(after["model"]) == sorted(before["model"])
    prov = after["avdiag_provenance"]
    assert prov["method"] == "abri" and prov["avdiag_version"] == avdiag.__version__
    assert prov["source_sha256"] == _sha(src) == result.source.sha256
    params = prov["parameters"]
    assert (params["mode"], params["alpha"], params["scope"], params["running_stats"]) == (
        "fold", 0.5, "flagged", "blend")
    assert params["layers"] == sorted(_example_scope())
    assert params["channels"] == _example_scope()
    assert any("optimizer" in w for w in result.warnings)


@pytest.mark.parametrize("args, scope, alpha, stats", [
    (["--stats", "reset"], "flagged", 0.5, "reset"),
    (["--stats", "blend", "--alpha", "0.3"], "flagged", 0.3, "blend"),
    (["--scope", "layers", "--alpha", "0.25"], "layers", 0.25, "blend"),
    (["--scope", "all", "--modality", "audio"], "all-audio", 0.5, "blend"),
], ids=["stats-reset", "alpha-0.3", "scope-layers", "scope-all-audio"])
def test_fold_options_on_the_command_line(tmp_path, cli, args, scope, alpha, stats):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    out = tmp_path / "out.pth"
    cli("reinit", src, "--out", out, "-q", *args).ok()
    assert _fingerprint(src) == before
    sd = _strip(_load(src)["model"])
    if scope == "flagged":
        layers: dict[str, list[int] | None] = dict(_example_scope())
    elif scope == "layers":
        layers = {layer: None for layer in _example_scope()}
    else:
        layers = {layer: None for layer in _bn_layers(_ogm(), "audio_net.")}
        assert len(layers) == 20
    after = _load(out)
    _assert_bits(_strip(after["model"]), _folded(sd, layers, alpha, stats))
    assert after["avdiag_provenance"]["parameters"]["scope"] == scope.split("-")[0]
    if scope == "all-audio":  # every visual tensor is untouched, the planted visual channels stay dead
        assert _dead_counts(out) == {"audio": 0, "visual": 5}
    else:
        _assert_clean(out)


def test_drop_optimizer(tmp_path, cli):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    run = cli("reinit", src, "--out", out, "--drop-optimizer", "-q").ok()
    assert run.err == ""  # no stale-optimizer warning once it is dropped
    before, after = _load(src), _load(out)
    assert list(after) == [k for k in before if k != "optimizer"] + ["avdiag_provenance"]
    _assert_same_tree(before["scheduler"], after["scheduler"])
    _assert_bits(_strip(after["model"]), _folded(_strip(before["model"]), _example_scope(), 0.5, "blend"))


def test_fold_on_a_generated_mmpareto_checkpoint(tmp_path, av_checkpoint):
    written = av_checkpoint("model.pth", "mmpareto", planted=True)
    src, planted = written.path, written.planted
    before = _fingerprint(src)
    out = tmp_path / "abri.pth"
    result = reinit(src, out)
    assert _fingerprint(src) == before
    scope = {layer: sorted(set(planted.dead.get(layer, [])) | set(planted.abnormal.get(layer, [])))
             for layer in {**planted.dead, **planted.abnormal}}
    sd = _strip(_load(src)["model"])
    after = _load(out)
    assert list(after) == ["model", "avdiag_provenance"]
    _assert_bits(_strip(after["model"]), _folded(sd, scope, 0.5, "blend"))  # the decoys are untouched
    assert result.dead_before == _dead_counts(src) == planted.dead_by_modality
    assert result.dead_after == _dead_counts(out) == {"audio": 0, "visual": 0}
    _assert_clean(out)
    MMParetoClassifier(N_CLASSES, width=WIDTH).load_state_dict(_strip(after["model"]), strict=True)


# --- 2. ABRi module mode ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["per-layer", "per-channel"])
def module_mode(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("module")
    src = _example_copy(folder)
    before = _fingerprint(src)
    out = folder / "abri-module.pth"
    result = reinit(src, out, ReinitOptions("abri", AbriOptions(mode="module", per_channel=request.param)))
    assert _fingerprint(src) == before
    return src, out, result, request.param


def test_module_mode_keys(module_mode):
    src, out, result, per_channel = module_mode
    before, after = _strip(_load(src)["model"]), _strip(_load(out)["model"])
    layers = sorted(_example_scope())
    assert result.parameters["layers"] == layers
    extra = {n for n in after if n not in before}
    assert extra == {f"{layer}.{leaf}" for layer in layers for leaf in (
        "abri_alpha", "abri_new.weight", "abri_new.bias", "abri_new.running_mean", "abri_new.running_var",
        "abri_new.num_batches_tracked")}
    _assert_bits({n: after[n] for n in before}, before)  # the pretrained branch keeps the original tensors
    for layer in layers:
        c = before[f"{layer}.weight"].shape[0]
        assert torch.equal(after[f"{layer}.abri_alpha"], torch.full((c,) if per_channel else (), 0.5))
        assert torch.equal(after[f"{layer}.abri_new.weight"], torch.ones(c))
        assert torch.equal(after[f"{layer}.abri_new.bias"], torch.zeros(c))
        assert torch.equal(after[f"{layer}.abri_new.running_mean"], torch.zeros(c))
        assert torch.equal(after[f"{layer}.abri_new.running_var"], torch.ones(c))
        assert int(after[f"{layer}.abri_new.num_batches_tracked"]) == 0
    assert _load(out)["avdiag_provenance"]["parameters"]["mode"] == "module"


@pytest.mark.parametrize("alpha", [0.5, 0.99])
def test_module_mode_judges_the_layers_the_model_trains_with(tmp_path, alpha):
    """After a module-mode rewrite the scan reads each converted layer as it trains: both branches
    normalise with the batch statistics, so the pair is one BatchNorm with gamma a*g + (1-a)*1 and beta
    a*b + (1-a)*0. A planted dead channel stays dead exactly where that blend's z is still below -3."""
    src = _example_copy(tmp_path)
    result = reinit(src, tmp_path / "m.pth", ReinitOptions("abri", AbriOptions(mode="module", alpha=alpha)))
    sd = _strip(_load(src)["model"])
    want = {}
    for layer, channels in _example_dead().items():
        g, b, rv = (sd[f"{layer}.{k}"].double() for k in ("weight", "bias", "running_var"))
        z = (alpha * b) / ((alpha * g + 1 - alpha).abs() * torch.sqrt(rv / (rv + 1e-5)))
        still = [c for c in channels if z[c] < -3]
        if still:
            want[layer] = still
    assert result.still_dead == want
    assert sum(result.dead_after.values()) == sum(len(c) for c in want.values())
    assert bool(want) is (alpha == 0.99)  # the default blend revives every planted channel, 0.99 does not


def test_module_mode_finetune_and_merge(module_mode):
    _, out, _, per_channel = module_mode
    layers = set(_example_scope())
    model = abri.convert(OGMGEClassifier(6, fusion="concat", width=WIDTH), per_channel=per_channel,
                         include=lambda name: name in layers)
    assert {name for name, _ in abri.abri_modules(model)} == layers
    model.load_state_dict(_strip(_load(out)["model"]), strict=True)

    g = torch.Generator().manual_seed(3)
    batches = [{"audio": torch.randn(4, 1, 64, 48, generator=g), "visual": torch.randn(4, 3, 2, 32, 32, generator=g),
                "label": torch.randint(6, (4,), generator=g)} for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        _, _, logits = model(batch["audio"], batch["visual"])
        F.cross_entropy(logits, batch["label"]).backward()
        if step == 0:
            for name, m in abri.abri_modules(model):
                grad = m.abri_alpha.grad
                assert grad is not None and grad.shape == m.abri_alpha.shape, name
                assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, name
        optimizer.step()
    alphas = torch.cat([m.abri_alpha.detach().reshape(-1) for _, m in abri.abri_modules(model)])
    assert bool((alphas != 0.5).all())

    model.eval()
    with torch.no_grad():
        unmerged = [model(b["audio"], b["visual"]) for b in batches]
    merged, report = abri.merge(model, batches, lambda m, b: m(b["audio"], b["visual"]))
    assert report.stats == "data" and set(report.layers) == layers
    assert not abri.abri_modules(merged)
    merged.eval()
    with torch.no_grad():
        for batch, expected in zip(batches, unmerged):
            for got, want in zip(merged(batch["audio"], batch["visual"]), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    _ogm(merged.state_dict())  # the merged model is the plain architecture again (strict load)


# --- 3. Diagnosing & Re-learning -------------------------------------------------------------------


def _encoder_features(model: OGMGEClassifier, batches) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled encoder outputs computed here: audio net on (B, 1, F, T); visual net on the frames folded
    into the batch, averaged over space, then over frames."""
    audio, visual, labels = [], [], []
    with torch.no_grad():
        for batch in batches:
            audio.append(model.audio_net(batch["audio"].unsqueeze(1)).mean(dim=(2, 3)))
            b, c, t, h, w = batch["visual"].shape
            frames = batch["visual"].permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            visual.append(model.visual_net(frames).mean(dim=(2, 3)).reshape(b, t, -1).mean(dim=1))
            labels.append(batch["label"])
    return ({"audio": torch.cat(audio).double().numpy(), "visual": torch.cat(visual).double().numpy()},
            torch.cat(labels).numpy())


def _purity(features: np.ndarray, labels: np.ndarray, k: int, seed: int) -> float:
    lo, hi = features.min(axis=0), features.max(axis=0)
    varying = hi > lo
    scaled = np.zeros_like(features)
    scaled[:, varying] = 2.0 * (features[:, varying] - lo[varying]) / (hi[varying] - lo[varying]) - 1.0
    _, clusters = kmeans2(scaled, k, minit="++", seed=seed)
    table = np.zeros((k, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return float(table.max(axis=1).sum()) / len(labels)


def _relearn_targets(prefixes: tuple[str, ...]) -> set[str]:
    """Conv weights and BN gamma/beta of the encoders under ``prefixes``, from the model itself."""
    out = set()
    for name, m in _ogm().named_modules():
        if not name.startswith(prefixes):
            continue
        if isinstance(m, nn.Conv2d):
            out.add(f"{name}.weight")
        elif isinstance(m, nn.BatchNorm2d):
            out |= {f"{name}.weight", f"{name}.bias"}
    return out


def _soft_reinit(sd, init, targets: set[str], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for name in targets:
        a = alphas["audio" if name.startswith("audio_net.") else "visual"]
        out[name] = (a * init[name].double() + (1 - a) * sd[name].double()).to(sd[name].dtype)
    return out


KMEANS_SEED = 2  # with this seed both modalities show a non-zero purity gap on the synthetic set


@pytest.fixture(scope="module")
def relearn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("relearn")
    src = _example_copy(folder)
    before = _fingerprint(src)
    torch.manual_seed(123)
    init = {k: v.detach().clone() for k, v in _ogm().state_dict().items()}
    init_path = folder / "init.pth"
    torch.save(init, init_path)
    out = folder / "relearn.pth"
    options = ReinitOptions("relearn", RelearnOptions(heldout_split="test", lam=3.0, init_ckpt=str(init_path),
                                                      seed=KMEANS_SEED))
    result = reinit(src, out, options, data=_data())
    assert _fingerprint(src) == before
    return src, out, result, init


def test_relearn_alpha_is_tanh_of_the_purity_gap(relearn):
    _, _, result, _ = relearn
    assert set(result.diagnosis) == {"audio", "visual"}
    for m, d in result.diagnosis.items():
        gap = abs(d["purity_train"] - d["purity_heldout"])
        assert gap > 0, m
        assert math.isclose(d["gap"], gap, rel_tol=0, abs_tol=1e-12)
        assert math.isclose(d["alpha"], math.tanh(3.0 * gap), rel_tol=0, abs_tol=1e-12)
        assert result.parameters["alphas"][m] == d["alpha"]
        assert d["n_train"] == d["n_heldout"] == 48


def test_relearn_purities_match_an_independent_computation(relearn):
    src, _, result, _ = relearn
    model = _ogm(_strip(_load(src)["model"]))
    train, y_train = _encoder_features(model, _batches("train"))
    held, y_held = _encoder_features(model, _batches("test"))
    assert not np.array_equal(y_train, y_held)  # the two splits really differ
    for m in ("audio", "visual"):
        expected_train = _purity(train[m], y_train, SYNTHETIC_CLASSES, KMEANS_SEED)
        expected_held = _purity(held[m], y_held, SYNTHETIC_CLASSES, KMEANS_SEED)
        assert abs(result.diagnosis[m]["purity_train"] - expected_train) <= 1e-12, m
        assert abs(result.diagnosis[m]["purity_heldout"] - expected_held) <= 1e-12, m


def test_relearn_features_pool_clips_of_several_frames_as_the_model_does():
    """The diagnosis hooks the visual encoder, which sees the frames folded into the batch: its maps are
    averaged over space, then over each clip's frames (3 here), equal to the computation above."""
    from avdiag.data import make_loader
    from avdiag.locate.resolve import ResolvedModel
    from avdiag.measure.contribution.learning_state import encoder_features

    torch.manual_seed(0)
    model = _ogm().eval()
    batches = list(make_loader(open_dataset(SYNTHETIC + ",frames=3,size=16"), batch_size=8))
    resolved = ResolvedModel(model, "test", ("audio", "visual"))
    got, labels = encoder_features(resolved, {"audio": "audio_net.", "visual": "visual_net."}, batches, "cpu")
    want, want_labels = _encoder_features(model, batches)
    assert np.array_equal(labels, want_labels)
    for m in ("audio", "visual"):
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-6)


def test_relearn_rewrites_exactly_the_encoder_weights(relearn):
    src, out, result, init = relearn
    sd = _strip(_load(src)["model"])
    after = _load(out)
    targets = _relearn_targets(("audio_net.", "visual_net."))
    assert {c.name for c in result.changes} == targets
    _assert_bits(_strip(after["model"]), _soft_reinit(sd, init, targets, result.parameters["alphas"]))
    assert after["avdiag_provenance"]["parameters"]["init"] == result.parameters["init"]
    assert after["avdiag_provenance"]["method"] == "relearn"


def test_relearn_given_alphas_with_generated_init(tmp_path, cli):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    cli("reinit", src, "--out", out, "--method", "relearn", "--alpha-audio", "0.25", "--alpha-visual", "0.6",
        "--init-seed", "7", "-q").ok()
    torch.manual_seed(7)
    init = _ogm().state_dict()
    targets = _relearn_targets(("audio_net.", "visual_net."))
    _assert_bits(_strip(_load(out)["model"]),
                 _soft_reinit(_strip(_load(src)["model"]), init, targets, {"audio": 0.25, "visual": 0.6}))


def test_relearn_one_alpha_without_data_is_a_usage_error(tmp_path, cli):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    message = cli("reinit", src, "--out", out, "--method", "relearn", "--alpha-visual", "0.5").error()
    assert message == "--method relearn needs --data to diagnose audio (or --alpha-audio)"
    assert not out.exists()


def test_relearn_restricted_modality_needs_only_its_alpha(tmp_path, cli):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    cli("reinit", src, "--out", out, "--method", "relearn", "--alpha-visual", "0.5", "--modality", "visual",
        "-q").ok()
    torch.manual_seed(0)
    init = _ogm().state_dict()
    _assert_bits(_strip(_load(out)["model"]), _soft_reinit(_strip(_load(src)["model"]), init,
                                                           _relearn_targets(("visual_net.",)), {"visual": 0.5}))


# --- 4. resets and recalibration -------------------------------------------------------------------


def test_reset_every_batchnorm(tmp_path):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    reinit(src, out, ReinitOptions("reset", ResetOptions(variant="all")))
    sd = _strip(_load(src)["model"])
    expected = dict(sd)
    for layer in _bn_layers(_ogm()):
        for role, value in zip(ROLES, (1.0, 0.0, 0.0, 1.0)):
            expected[f"{layer}.{role}"] = torch.full_like(sd[f"{layer}.{role}"], value)
    _assert_bits(_strip(_load(out)["model"]), expected)  # num_batches_tracked, convs and heads untouched


def test_reset_tiny_gamma_channels_only(tmp_path):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    reinit(src, out, ReinitOptions("reset", ResetOptions(variant="tiny-gamma")))
    sd = _strip(_load(src)["model"])
    tiny = {layer: torch.nonzero(sd[f"{layer}.weight"].abs() < 1e-6).flatten().tolist()
            for layer in _bn_layers(_ogm())}
    assert {k: v for k, v in tiny.items() if v} == PLANTED["abnormal_pair"]
    expected = dict(sd)
    for layer, channels in PLANTED["abnormal_pair"].items():
        for role, value in zip(ROLES, (1.0, 0.0, 0.0, 1.0)):
            t = sd[f"{layer}.{role}"].clone()
            t[channels] = value
            expected[f"{layer}.{role}"] = t
    _assert_bits(_strip(_load(out)["model"]), expected)


def _recomputed_stats(sd: dict[str, torch.Tensor], layers: set[str]) -> dict[str, torch.Tensor]:
    """torch's own BatchNorm2d, in training mode with a cumulative average, over the synthetic train
    split; every other module in eval mode."""
    model = _ogm(sd)
    for name, m in model.named_modules():
        if name in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for batch in _batches("train"):
            model(batch["audio"], batch["visual"])
    state = model.state_dict()
    return {f"{layer}.{role}": state[f"{layer}.{role}"] for layer in layers
            for role in ("running_mean", "running_var")}


def test_recalibrate_only_the_running_stats_of_the_scoped_layers(tmp_path):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    out = tmp_path / "out.pth"
    result = reinit(src, out, ReinitOptions("recalibrate", modality="audio"), data=_data())
    assert _fingerprint(src) == before
    sd = _strip(_load(src)["model"])
    after = _strip(_load(out)["model"])
    audio = set(_bn_layers(_ogm(), "audio_net."))
    stats = _recomputed_stats(sd, audio)
    assert {c.name for c in result.changes} == set(stats)
    _assert_bits({n: t for n, t in after.items() if n not in stats}, {n: t for n, t in sd.items() if n not in stats})
    for name, expected in stats.items():
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_fold_with_data_stats(tmp_path):
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    result = reinit(src, out, ReinitOptions("abri", AbriOptions(stats="data")), data=_data())
    assert result.parameters["running_stats"] == "data"
    sd = _strip(_load(src)["model"])
    folded = _folded(sd, _example_scope(), 0.5, None)
    stats = _recomputed_stats(folded, set(_example_scope()))
    expected = dict(folded)
    for layer, channels in _example_scope().items():
        for role in ("running_mean", "running_var"):
            t = sd[f"{layer}.{role}"].clone()
            t[channels] = stats[f"{layer}.{role}"][channels]
            expected[f"{layer}.{role}"] = t
    after = _strip(_load(out)["model"])
    assert sorted(after) == sorted(expected)
    for name, want in expected.items():
        torch.testing.assert_close(after[name], want, rtol=1e-5, atol=1e-6, msg=name)
        if name not in stats:
            assert _raw(after[name]) == _raw(want), name


# --- 5. safety and the command line ----------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--method", "abri"],
    ["--method", "abri", "--mode", "module"],
    ["--method", "reset"],
    ["--method", "reset", "--variant", "tiny-gamma"],
    ["--method", "relearn", "--alpha-audio", "0.3", "--alpha-visual", "0.6"],
    ["--method", "recalibrate", "--data", SYNTHETIC, "--device", "cpu", "--batch-size", "16"],
], ids=["abri", "abri-module", "reset", "reset-tiny", "relearn", "recalibrate"])
def test_the_input_is_never_modified(tmp_path, cli, args):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    out = tmp_path / "out.pth"
    cli("reinit", src, "--out", out, "-q", *args).ok()
    assert _fingerprint(src) == before
    assert out.exists() and _sha(out) != before[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pth", "out.pth"]


def test_out_equal_to_the_input_is_refused(tmp_path, cli):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    assert cli("reinit", src, "--out", src).error() == f"refusing to overwrite the input {src} (use --in-place)"
    assert _fingerprint(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_in_place(tmp_path, cli):
    src = _example_copy(tmp_path)
    original = _sha(src)
    sd = _strip(_load(src)["model"])
    cli("reinit", src, "--in-place", "-q").ok()
    assert _sha(src) != original
    after = _load(src)
    assert after["avdiag_provenance"]["source_sha256"] == original
    _assert_bits(_strip(after["model"]), _folded(sd, _example_scope(), 0.5, "blend"))
    _assert_clean(src)
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def _failing_writer(error: BaseException):
    def writer(obj, legacy: bool):
        def write(tmp, f) -> None:
            f.write(b"PK\x03\x04" + b"\0" * 4096)  # half a zip file
            f.flush()
            raise error
        return write
    return writer


@pytest.mark.parametrize("in_place", [False, True], ids=["new-target", "in-place"])
def test_a_failing_write_leaves_no_target(tmp_path, monkeypatch, in_place):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    monkeypatch.setattr(write_module, "_torch_writer", _failing_writer(RuntimeError("disk unplugged")))
    out = src if in_place else tmp_path / "out.pth"
    with pytest.raises(RuntimeError, match="disk unplugged"):
        reinit(src, out, in_place=in_place)
    assert _fingerprint(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]  # no target, no temporary


def test_a_write_error_on_the_command_line(tmp_path, monkeypatch, cli):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    monkeypatch.setattr(write_module, "_torch_writer", _failing_writer(OSError(28, "No space left on device")))
    out = tmp_path / "out.pth"
    cli("reinit", src, "--out", out).error("No space left on device")
    assert _fingerprint(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def _corrupting_plain_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach() + 1  # what lands in the file is not what was intended


def test_a_failed_verification_removes_the_new_target(tmp_path, monkeypatch):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    monkeypatch.setattr(write_module, "_plain_tensor", _corrupting_plain_tensor)
    out = tmp_path / "out.pth"
    with pytest.raises(VerificationError, match=r"^the written file differs from the intended rewrite at \d+ "):
        reinit(src, out)
    assert _fingerprint(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_a_verification_that_crashes_leaves_no_unverified_target(tmp_path, monkeypatch):
    """Whatever goes wrong while checking the written file, an unverified file is not left behind."""
    import avdiag.workflows.reinit as reinit_module

    def crash(*args, **kwargs):
        raise RuntimeError("the check itself failed")

    src = _example_copy(tmp_path)
    monkeypatch.setattr(reinit_module, "_forward_check", crash)
    out = tmp_path / "out.pth"
    with pytest.raises(VerificationError, match=r"verifying the written file failed "
                                                r"\(RuntimeError: the check itself failed\); nothing was written"):
        reinit(src, out)
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_a_failed_verification_in_place_keeps_the_input(tmp_path, monkeypatch):
    """A rewrite that fails its own verification must not cost the user the checkpoint: the
    writer promises that an exception leaves the target as it was."""
    src = _example_copy(tmp_path)
    original = _sha(src)
    monkeypatch.setattr(write_module, "_plain_tensor", _corrupting_plain_tensor)
    with pytest.raises(VerificationError, match=r"^the written file differs from the intended rewrite at \d+ "):
        reinit(src, src, in_place=True)
    assert src.exists(), "the failed in-place rewrite deleted the input checkpoint"
    assert _sha(src) == original


def test_diff_after_a_fold(fold, cli):
    src, out, result = fold
    report = cli("diff", src, out, "--json", "-").json()
    rewritten = {f"{layer}.{role}" for layer in _example_scope() for role in ROLES}
    assert {c["name"] for c in report["changed"]} == rewritten == {c.name for c in result.changes}
    assert report["added"] == [] and report["removed"] == []
    revived = {layer["name"]: layer["revived"] for layer in report["bn_layers"] if layer["revived"]}
    assert revived == _example_dead()
    assert all(layer["died"] == [] for layer in report["bn_layers"])
    assert report["summary"]["n_revived"] == 22 and report["summary"]["n_dead_after"] == 0


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "--method must be one of abri, recalibrate, relearn, reset"),
    (["--scope", "nope"], "--scope must be one of flagged, layers, all"),
    (["--mode", "nope"], "--mode must be fold or module"),
    (["--stats", "nope"], "--stats must be one of reset, blend, data"),
    (["--variant", "nope", "--method", "reset"], "--variant must be all or tiny-gamma"),
    (["--stats", "data"], "--stats data needs --data"),
    (["--method", "relearn"], "--method relearn needs --data (or --alpha-audio/--alpha-visual to skip the diagnosis)"),
    (["--method", "recalibrate"], "--method recalibrate needs --data"),
], ids=["method", "scope", "mode", "stats", "variant", "stats-data-without-data", "relearn-without-data",
        "recalibrate-without-data"])
def test_bad_options_are_one_line_errors(tmp_path, cli, args, message):
    src = _example_copy(tmp_path)
    before = _fingerprint(src)
    out = tmp_path / "out.pth"
    assert cli("reinit", src, "--out", out, *args).error() == message  # nothing on stdout either
    assert not out.exists()
    assert _fingerprint(src) == before


@pytest.mark.parametrize("options, message", [
    (ReinitOptions("nope"), "--method must be one of abri, recalibrate, relearn, reset"),
    (ReinitOptions("abri", AbriOptions(scope="nope")), "--scope must be one of flagged, layers, all"),
    (ReinitOptions("abri", AbriOptions(mode="nope")), "--mode must be fold or module"),
    (ReinitOptions("abri", AbriOptions(stats="nope")), "--stats must be one of reset, blend, data"),
    (ReinitOptions("abri", AbriOptions(stats="data")), "--stats data needs --data"),
    (ReinitOptions("reset", ResetOptions(variant="nope")), "--variant must be all or tiny-gamma"),
    (ReinitOptions("relearn"),
     "--method relearn needs --data (or --alpha-audio/--alpha-visual to skip the diagnosis)"),
    (ReinitOptions("recalibrate"), "--method recalibrate needs --data"),
    (ReinitOptions("reset", AbriOptions()), "--method reset takes ResetOptions, not AbriOptions"),
], ids=["method", "scope", "mode", "stats", "stats-data-without-data", "variant", "relearn-without-data",
        "recalibrate-without-data", "settings-of-another-method"])
def test_bad_options_through_the_library(tmp_path, options, message):
    src = _example_copy(tmp_path)
    with pytest.raises(UsageError) as caught:
        reinit(src, tmp_path / "out.pth", options)
    assert str(caught.value) == message
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_the_options_of_the_command_line():
    """Every flag lands in the chosen method's settings; the other methods' flags are left out."""
    flags = {"mode": "module", "alpha": 0.3, "per_channel": True, "scope": "layers", "stats": "reset",
             "variant": "tiny-gamma", "lam": 2.0, "alphas": {"audio": 0.1}, "init_ckpt": "init.pt", "seed": 7}
    assert ReinitOptions.from_flags("abri", flags, modality="audio") == ReinitOptions(
        "abri", AbriOptions(mode="module", alpha=0.3, per_channel=True, scope="layers", stats="reset"), "audio")
    assert ReinitOptions.from_flags("reset", flags) == ReinitOptions("reset", ResetOptions(variant="tiny-gamma"))
    assert ReinitOptions.from_flags("relearn", flags) == ReinitOptions(
        "relearn", RelearnOptions(lam=2.0, alphas={"audio": 0.1}, init_ckpt="init.pt", seed=7))
    assert ReinitOptions.from_flags("recalibrate", flags) == ReinitOptions("recalibrate", RecalibrateOptions())
    with pytest.raises(UsageError, match="^--method must be one of "):
        ReinitOptions.from_flags("nope", flags)


# --- 6. the result, the registry, the data read once -------------------------------------------------


def test_the_result_follows_the_contract(fold):
    src, out, result = fold
    doc = result.to_dict()
    json.dumps(doc, allow_nan=False)
    assert doc["schema_version"] == avdiag.SCHEMA_VERSION == "1.1"
    assert doc["tool"] == {"name": "avdiag", "version": avdiag.__version__, "command": "reinit"}
    assert doc["checkpoints"] == [{"path": str(src), "format": result.source.format, "sha256": _sha(src)}]
    assert doc["source"] == doc["checkpoints"][0]
    assert doc["summary"] == {"n_rewritten": 28, "n_dead_before": 22, "n_dead_after": 0,
                              "n_revived_beyond_blend": 0, "n_still_dead": 0, "text": result.summary_line()}
    assert doc["target"] == str(out) and doc["method"] == "abri"
    for key in ("parameters", "diagnosis", "changes", "dead_before", "dead_after", "verification", "warnings"):
        assert key in doc, key
    verification = dict(doc["verification"])
    change = verification.pop("output_change")  # how far one batch's outputs moved (synthetic without --data)
    assert verification == {"reloaded": True, "identical": result.verification["identical"], "rewritten": 28,
                            "forward": "finite"}
    assert change["batch"] == "synthetic" and change["samples"] == 2
    assert 0 < change["max_abs"] and 0 < change["max_abs_before"]
    assert type(result).from_dict(json.loads(json.dumps(doc))).to_dict() == doc
    frame = result.to_frame()
    assert list(frame.columns) == ["name", "channels_changed", "norm_before", "norm_after"]
    assert list(frame["name"]) == [c.name for c in result.changes] and len(frame) == 28
    assert list(frame["channels_changed"]) == [c.channels_changed for c in result.changes]


def test_a_new_tensor_has_no_norm_before(module_mode):
    _, _, result, _ = module_mode
    added = [c for c in result.changes if c.name.endswith(".abri_alpha")]
    assert added and all(c.norm_before is None for c in added)
    doc = result.to_dict()
    assert all(c["norm_before"] is None for c in doc["changes"] if c["name"].endswith(".abri_alpha"))
    assert math.isnan(result.to_frame().set_index("name").loc[added[0].name, "norm_before"])


@dataclass
class ScaleGammaOptions:
    factor: float = 2.0  # every gamma in scope is multiplied by it


def _scale_gamma_validate(o: ScaleGammaOptions, has_data: bool) -> None:
    if not o.factor > 0:
        raise UsageError("--factor must be positive")


def _scale_gamma_apply(target: methods.RewriteInput, o: ScaleGammaOptions) -> methods.Rewrite:
    tensors = {v.layer.params["weight"]: target.tensor(v.layer.params["weight"]) * o.factor
               for v in target.scoped_layers()}
    return methods.Rewrite(tensors, {"method": "scale-gamma", "factor": o.factor, "modality": target.modality})


@pytest.fixture
def scale_gamma():
    """A toy method, registered for one test (what one new file under avdiag/rewrite/methods/ would hold)."""
    method = methods.register(methods.Method("scale-gamma", ScaleGammaOptions, _scale_gamma_apply,
                                             _scale_gamma_validate))
    try:
        yield method
    finally:
        methods.unregister("scale-gamma")


def test_a_registered_method_is_selectable_by_name(tmp_path, scale_gamma):
    assert "scale-gamma" in methods.names()
    src = _example_copy(tmp_path)
    out = tmp_path / "scaled.pth"
    result = reinit(src, out, ReinitOptions("scale-gamma", ScaleGammaOptions(3.0), modality="visual"))
    sd = _strip(_load(src)["model"])
    expected = dict(sd)
    for layer in _bn_layers(_ogm(), "visual_net."):
        expected[f"{layer}.weight"] = sd[f"{layer}.weight"] * 3.0
    after = _load(out)
    _assert_bits(_strip(after["model"]), expected)
    assert after["avdiag_provenance"]["method"] == "scale-gamma"
    assert after["avdiag_provenance"]["parameters"] == {"method": "scale-gamma", "factor": 3.0, "modality": "visual"}
    assert result.method == "scale-gamma" and result.verification["forward"] == "finite"
    with pytest.raises(UsageError, match="^--factor must be positive$"):
        reinit(src, tmp_path / "bad.pth", ReinitOptions("scale-gamma", ScaleGammaOptions(0.0)))
    with pytest.raises(ValueError, match="registered already"):
        methods.register(scale_gamma)


def test_an_unregistered_method_is_gone(tmp_path):
    methods.register(methods.Method("scale-gamma", ScaleGammaOptions, _scale_gamma_apply))
    methods.unregister("scale-gamma")
    assert methods.names() == ("abri", "recalibrate", "relearn", "reset")
    with pytest.raises(UsageError) as caught:
        reinit(_example_copy(tmp_path), tmp_path / "out.pth", ReinitOptions("scale-gamma"))
    assert str(caught.value) == "--method must be one of abri, recalibrate, relearn, reset"


def test_the_input_is_opened_once(tmp_path, monkeypatch):
    import avdiag.load as load_module

    opened: list[Path] = []
    real = load_module.load_checkpoint

    def counting(path, **kwargs):
        opened.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(load_module, "load_checkpoint", counting)
    src = _example_copy(tmp_path)
    out = tmp_path / "out.pth"
    reinit(src, out)
    assert opened[0] == src and opened.count(src) == 1
    assert opened[-1] == out and len(opened) == 3  # the input, the temporary file verified, the target re-scanned


@pytest.fixture
def dataset_reads(monkeypatch):
    """How many items the synthetic dataset decodes."""
    cls = type(open_dataset(SYNTHETIC, split="train"))
    reads = {"n": 0}
    real = cls.__getitem__

    def counting(self, i):
        reads["n"] += 1
        return real(self, i)

    monkeypatch.setattr(cls, "__getitem__", counting)
    return reads


def test_data_stats_and_the_forward_check_read_the_split_once(tmp_path, dataset_reads):
    src = _example_copy(tmp_path)
    result = reinit(src, tmp_path / "out.pth", ReinitOptions("abri", AbriOptions(stats="data")), data=_data())
    assert result.verification["forward"] == "finite"
    assert dataset_reads["n"] == 48  # one pass over the train split; the forward check reuses its first batch


def test_relearn_reads_each_split_once(tmp_path, dataset_reads):
    src = _example_copy(tmp_path)
    result = reinit(src, tmp_path / "out.pth", ReinitOptions("relearn"), data=_data())
    assert set(result.diagnosis) == {"audio", "visual"} and result.verification["forward"] == "finite"
    assert dataset_reads["n"] == 48 + 48  # train and test once each


def test_a_shared_subject_keeps_its_model(tmp_path):
    """The data steps swap tensors into the Subject's cached model only while they run."""
    from avdiag.workflows.subject import Subject

    src = _example_copy(tmp_path)
    subject = Subject.open(src)
    data = _data()
    model = subject.model_for(data)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    result = reinit(subject, tmp_path / "out.pth", ReinitOptions("abri", AbriOptions(stats="data")), data=data)
    assert result.source.path == str(src)
    assert subject.model_for(data) is model
    after = model.module.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k].cpu(), before[k].cpu()) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast runs on CUDA only")
def test_amp_recalibration_on_cuda(tmp_path):
    src = _example_copy(tmp_path)
    full = reinit(src, tmp_path / "fp32.pth", ReinitOptions("recalibrate"),
                  data=DataSource(SYNTHETIC, device="cuda", batch_size=BATCH))
    mixed = reinit(src, tmp_path / "amp.pth", ReinitOptions("recalibrate"),
                   data=DataSource(SYNTHETIC, device="cuda", batch_size=BATCH, amp=True))
    assert mixed.verification["forward"] == full.verification["forward"] == "finite"
    a, b = _strip(_load(tmp_path / "fp32.pth")["model"]), _strip(_load(tmp_path / "amp.pth")["model"])
    differs = False
    for name in (c.name for c in full.changes):
        assert a[name].dtype == b[name].dtype == torch.float32, name
        torch.testing.assert_close(b[name], a[name], rtol=2e-2, atol=2e-2, msg=name)
        differs |= not torch.equal(a[name], b[name])
    assert differs, "autocast changed nothing: amp was not honoured"

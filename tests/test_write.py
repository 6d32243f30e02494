"""Writing rewritten checkpoints back: every format round-trips, untouched tensors stay bit-identical, the
provenance is readable, and the write is atomic (an exception or a SIGKILL never leaves a damaged target).

Each written file is read back twice: with avdiag's own loader and with the plain readers a user would
use (``torch.load(weights_only=True)``, ``safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from avdiag.errors import UsageError
from avdiag.load import detect, load_checkpoint
from avdiag.load.write import (
    PROVENANCE_KEY,
    SAFETENSORS_PROVENANCE_KEY,
    SAFETENSORS_VERSION_KEY,
    STALE_OPTIMIZER_WARNING,
    TMP_MARKER,
    Provenance,
    read_provenance,
    write_checkpoint,
)

PROV = Provenance("reinit", {"layers": ("audio_net.conv1",), "scale": 0.5, "seed": 0}, "ab" * 32, "0.1.0")


# -- fixtures and checks --------------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    """Clean names -> tensors of several dtypes, with bit patterns that a float comparison would hide."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 3, 3, generator=g)
    conv[0, 0, 0, 0] = float("nan")
    conv[0, 0, 0, 1] = -0.0
    return {
        "audio_net.conv1.weight": conv,
        "audio_net.bn1.weight": torch.rand(4, generator=g),
        "audio_net.bn1.running_mean": torch.randn(4, generator=g),
        "audio_net.bn1.num_batches_tracked": torch.tensor(7),
        "visual_net.fc.weight": torch.randn(5, 6, generator=g).half(),
        "visual_net.mask": torch.rand(6, generator=g) > 0.5,
        "fusion.fc.weight": torch.randn(3, 10, generator=g).bfloat16(),
        "fusion.fc.bias": torch.zeros(3),
    }


CHANGED = {"audio_net.bn1.weight": torch.tensor([0.25, 0.5, 0.75, 1.0])}
ADDED = {"fusion.abri.weight": torch.ones(2, 2)}
DROPPED = {"visual_net.mask"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape), name
    assert torch.equal(_bits(a), _bits(b)), name


def _expected(source: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """File names -> tensors the rewritten file must hold, for the CHANGED/ADDED/DROPPED edit."""
    out = {prefix + k: v for k, v in source.items() if k not in DROPPED}
    out.update({prefix + k: v for k, v in {**CHANGED, **ADDED}.items()})
    return out


def _assert_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    found = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    assert sorted(found) == sorted(expected)
    for name, t in expected.items():
        _assert_same(found[name], t, name)


def _by_file_name(path: Path) -> dict[str, torch.Tensor]:
    """The tensors as avdiag reads them, under the names they have in the file."""
    ckpt = load_checkpoint(path)
    return {ckpt.original_names.get(n, n): ckpt.tensors.get(n) for n in ckpt.tensors.names()}


def _assert_tree_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        _assert_same(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_tree_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree_same(x, y)
    else:
        assert a == b


def _edit(ckpt, out: Path, **kwargs) -> list[str]:
    return write_checkpoint(ckpt, {**CHANGED, **ADDED}, out, provenance=PROV, drop=DROPPED, **kwargs)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARKER in p.name)


def _optimizer() -> dict:
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]}


def _nested(path: Path) -> dict:
    root = {"saved_epoch": 3, "model": {"module." + k: v for k, v in _state().items()}, "optimizer": _optimizer(),
            "scheduler": {"last_epoch": 3, "_last_lr": [0.1]}}
    torch.save(root, path)
    return root


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 2)


# -- torch pickles --------------------------------------------------------------------------------------


def test_nested_torch_keeps_optimizer_and_warns(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    root = _nested(src)
    before = _sha(src)
    ckpt = load_checkpoint(src)
    assert ckpt.state_path == ["model"]
    assert _edit(ckpt, out) == [STALE_OPTIMIZER_WARNING]
    assert _sha(src) == before

    expected = _expected(_state(), "module.")
    assert "module.fusion.abri.weight" in expected and "module.visual_net.mask" not in expected
    _assert_tensors(_by_file_name(out), expected)
    obj = torch.load(out, weights_only=True)
    _assert_tensors(obj["model"], expected)
    assert obj["saved_epoch"] == 3 and obj["scheduler"] == root["scheduler"]
    _assert_tree_same(obj["optimizer"], root["optimizer"])
    assert obj[PROVENANCE_KEY] == PROV.to_dict()
    again = load_checkpoint(out)
    assert again.format == detect.TORCH_ZIP and again.state_path == ["model"]
    assert read_provenance(again) == PROV.to_dict()
    assert PROVENANCE_KEY not in ckpt.root and "module.fusion.abri.weight" not in ckpt.root["model"]  # untouched


def test_drop_optimizer_removes_it(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    _nested(src)
    assert _edit(load_checkpoint(src), out, drop_optimizer=True) == []
    obj = torch.load(out, weights_only=True)
    assert "optimizer" not in obj and obj["scheduler"]["last_epoch"] == 3 and obj["saved_epoch"] == 3
    _assert_tensors(obj["model"], _expected(_state(), "module."))


def test_lightning_optimizer_states(tmp_path):
    src = tmp_path / "in.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": _state(), "optimizer_states": [_optimizer()],
                "lr_schedulers": [{"last_epoch": 1}], "global_step": 10}, src)
    ckpt = load_checkpoint(src)
    assert _edit(ckpt, tmp_path / "kept.ckpt") == [STALE_OPTIMIZER_WARNING]
    assert _edit(ckpt, tmp_path / "dropped.ckpt", drop_optimizer=True) == []
    kept, dropped = (torch.load(tmp_path / n, weights_only=True) for n in ("kept.ckpt", "dropped.ckpt"))
    assert "optimizer_states" in kept and "optimizer_states" not in dropped
    for obj in (kept, dropped):
        _assert_tensors(obj["state_dict"], _expected(_state(), ""))
        assert obj["global_step"] == 10 and obj["lr_schedulers"] == [{"last_epoch": 1}]


def test_pickled_module_is_written_only_as_safetensors(tmp_path):
    src = tmp_path / "whole.pt"
    model = Tiny()
    torch.save(model, src)
    ckpt = load_checkpoint(src, unsafe=True)
    with pytest.raises(UsageError, match="nn.Module"):
        write_checkpoint(ckpt, {}, tmp_path / "out.pt", provenance=PROV)
    write_checkpoint(ckpt, {}, tmp_path / "out.safetensors", provenance=PROV)
    _assert_tensors(load_file(tmp_path / "out.safetensors"), model.state_dict())


def test_bare_state_dict_of_a_real_module(tmp_path):
    model = Tiny()
    model.audio_net[1].running_var.fill_(2.0)
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    src, out = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(sd, src)
    new_w = torch.full((4,), 0.5)
    ckpt = load_checkpoint(src)
    assert ckpt.state_path == []
    assert write_checkpoint(ckpt, {"audio_net.1.weight": new_w}, out, provenance=PROV) == []

    loaded = torch.load(out, weights_only=True)
    expected = dict(sd, **{"audio_net.1.weight": new_w})
    _assert_tensors(loaded, expected)
    _assert_tensors(_by_file_name(out), expected)
    meta = loaded._metadata
    assert json.loads(meta[PROVENANCE_KEY]["provenance"]) == PROV.to_dict()
    assert meta["audio_net.1"] == sd._metadata["audio_net.1"]  # BatchNorm's version entry kept
    assert PROVENANCE_KEY not in sd._metadata  # the input's object was not modified
    assert read_provenance(load_checkpoint(out)) == PROV.to_dict()

    fresh = Tiny()
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.audio_net[1].weight.detach(), new_w)
    assert torch.equal(fresh.audio_net[1].running_var, torch.full((4,), 2.0))


def test_bare_plain_dict_gets_metadata(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(dict(_state()), src)
    _edit(load_checkpoint(src), out)
    loaded = torch.load(out, weights_only=True)
    _assert_tensors(loaded, _expected(_state(), ""))
    assert json.loads(loaded._metadata[PROVENANCE_KEY]["provenance"])["method"] == "reinit"


def test_nested_prefixed_real_module_loads_strictly(tmp_path):
    model = Tiny()
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"epoch": 1, "model": nn.DataParallel(model).state_dict()}, src)
    new_bias = torch.tensor([1.0, -1.0])
    write_checkpoint(load_checkpoint(src), {"fc.bias": new_bias}, out, provenance=PROV)
    obj = torch.load(out, weights_only=True)
    assert "module.fc.bias" in obj["model"] and obj[PROVENANCE_KEY]["method"] == "reinit"
    wrapped = nn.DataParallel(Tiny())
    wrapped.load_state_dict(obj["model"], strict=True)
    assert torch.equal(wrapped.module.fc.bias.detach(), new_bias)
    assert torch.equal(wrapped.module.audio_net[0].weight, model.audio_net[0].weight)


def test_legacy_stays_legacy(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"state_dict": _state(), "epoch": 2}, src, _use_new_zipfile_serialization=False)
    _edit(load_checkpoint(src), out)
    assert detect.detect_format(out) == detect.TORCH_LEGACY
    obj = torch.load(out, weights_only=True)
    _assert_tensors(obj["state_dict"], _expected(_state(), ""))
    assert obj["epoch"] == 2 and obj[PROVENANCE_KEY] == PROV.to_dict()
    _assert_tensors(_by_file_name(out), _expected(_state(), ""))


def test_allowed_global_placeholders_are_not_written_as_torch(tmp_path):
    src = tmp_path / "in.pt"
    torch.save({"model": _state(), "args": Hyper(3)}, src)
    ckpt = load_checkpoint(src, allow_globals=[f"{__name__}.Hyper"])
    with pytest.raises(UsageError, match="--allow-global"):
        _edit(ckpt, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    _edit(ckpt, tmp_path / "out.safetensors")
    _assert_tensors(load_file(tmp_path / "out.safetensors"), _expected(_state(), ""))


class Hyper:
    def __init__(self, depth):
        self.depth = depth


# -- safetensors ----------------------------------------------------------------------------------------


def test_safetensors_round_trip_keeps_metadata(tmp_path):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(_state(), src, metadata={"format": "pt", "trained_on": "vggsound"})
    _edit(load_checkpoint(src), out)
    _assert_tensors(load_file(out), _expected(_state(), ""))
    _assert_tensors(_by_file_name(out), _expected(_state(), ""))
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["trained_on"] == "vggsound" and meta[SAFETENSORS_VERSION_KEY] == "0.1.0"
    assert json.loads(meta[SAFETENSORS_PROVENANCE_KEY]) == PROV.to_dict()
    assert read_provenance(load_checkpoint(out)) == PROV.to_dict()
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()  # not save_file's private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("target, fmt", [("out.safetensors", None), ("out.bin", "safetensors")])
def test_torch_to_safetensors_keeps_file_names(tmp_path, target, fmt):
    src, out = tmp_path / "in.pt", tmp_path / target
    root = _nested(src)
    tied = root["model"]["module.fusion.fc.weight"]
    root["model"]["module.fusion.head.weight"] = tied  # tied weights: one storage under two names
    torch.save(root, src)
    notes = _edit(load_checkpoint(src), out, fmt=fmt)
    assert any("saved_epoch" in w and "optimizer" in w for w in notes)
    expected = _expected(_state(), "module.")
    expected["module.fusion.head.weight"] = tied
    _assert_tensors(load_file(out), expected)
    _assert_tensors(_by_file_name(out), expected)
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()[SAFETENSORS_PROVENANCE_KEY]) == PROV.to_dict()


def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    state = _state()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for shard, part in shards.items():
        save_file({n: state[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_sharded_only_to_one_safetensors_file(tmp_path):
    state = _sharded(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UsageError, match="--out something.safetensors"):
        _edit(ckpt, tmp_path / "out.pt")
    with pytest.raises(UsageError, match="sharded input"):
        _edit(ckpt, tmp_path / "ckpt" / "model-00001-of-00002.safetensors", fmt="safetensors", in_place=True)
    out = tmp_path / "merged.safetensors"
    _edit(ckpt, out)
    _assert_tensors(load_file(out), _expected(state, ""))
    _assert_tensors(_by_file_name(out), _expected(state, ""))
    assert read_provenance(load_checkpoint(out)) == PROV.to_dict()


def test_torchscript_only_to_safetensors(tmp_path):
    src = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's deprecation notice
        torch.jit.script(nn.Linear(3, 2)).save(str(src))
    ckpt = load_checkpoint(src)
    with pytest.raises(UsageError, match="--out something.safetensors"):
        write_checkpoint(ckpt, {}, tmp_path / "out.pt", provenance=PROV)
    out = tmp_path / "out.safetensors"
    new_bias = torch.tensor([3.0, 4.0])
    notes = write_checkpoint(ckpt, {"bias": new_bias}, out, provenance=PROV)
    assert any("torchscript" in w for w in notes)
    loaded = load_file(out)
    _assert_same(loaded["bias"], new_bias)
    _assert_same(loaded["weight"], ckpt.tensors.get("weight").detach())


def test_safetensors_to_torch_is_a_bare_state_dict(tmp_path):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.pt"
    save_file({"module." + k: v for k, v in _state().items()}, src)
    _edit(load_checkpoint(src), out, fmt="torch-zip")
    loaded = torch.load(out, weights_only=True)
    _assert_tensors(loaded, _expected(_state(), "module."))
    assert json.loads(loaded._metadata[PROVENANCE_KEY]["provenance"]) == PROV.to_dict()


# -- provenance -----------------------------------------------------------------------------------------


def test_provenance_is_plain_data_and_chains(tmp_path):
    prov = Provenance("abri", {"paths": (Path("/x"), "y"), "ratio": float("nan"), "ids": {3, 1}}, None, "0.1.0")
    d = prov.to_dict()
    assert d["parameters"] == {"paths": ["/x", "y"], "ratio": "nan", "ids": [1, 3]}
    json.dumps(d, allow_nan=False)

    src, first, second = tmp_path / "in.pt", tmp_path / "a.pt", tmp_path / "b.safetensors"
    _nested(src)
    write_checkpoint(load_checkpoint(src), {}, first, provenance=PROV)
    write_checkpoint(load_checkpoint(first), {}, second, provenance=prov)
    found = read_provenance(load_checkpoint(second))
    assert found["method"] == "abri" and found["previous"] == PROV.to_dict()

    made = Provenance.for_checkpoint(load_checkpoint(src), "reinit", {"k": 1})
    assert made.source_sha256 == _sha(src) and made.avdiag_version


def test_bad_names_are_refused(tmp_path):
    src = tmp_path / "in.pt"
    _nested(src)
    ckpt = load_checkpoint(src)
    with pytest.raises(UsageError, match="^cannot drop 'nope': the checkpoint has no such tensor$"):
        write_checkpoint(ckpt, {}, tmp_path / "o.pt", provenance=PROV, drop={"nope"})
    with pytest.raises(UsageError, match="^tensor 'audio_net.bn1.weight' is both rewritten and dropped$"):
        write_checkpoint(ckpt, CHANGED, tmp_path / "o.pt", provenance=PROV, drop=set(CHANGED))
    with pytest.raises(UsageError, match=r"^cannot write format 'onnx' \(choose one of "):
        write_checkpoint(ckpt, {}, tmp_path / "o.pt", provenance=PROV, fmt="onnx")
    assert list(tmp_path.iterdir()) == [src]


# -- where it writes ------------------------------------------------------------------------------------


def test_refuses_to_overwrite_the_input_unless_in_place(tmp_path):
    src = tmp_path / "in.pt"
    _nested(src)
    before = _sha(src)
    ckpt = load_checkpoint(src)
    with pytest.raises(UsageError, match=r"refusing to overwrite the input .* \(use --in-place\)"):
        _edit(ckpt, src)
    link = tmp_path / "alias.pt"
    link.symlink_to(src)
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        _edit(ckpt, link)
    assert _sha(src) == before and _leftovers(tmp_path) == []

    os.chmod(src, 0o640)
    _edit(ckpt, src, in_place=True)  # the input's tensors are mmapped from the file being replaced
    assert os.stat(src).st_mode & 0o777 == 0o640
    _assert_tensors(torch.load(src, weights_only=True)["model"], _expected(_state(), "module."))
    assert _leftovers(tmp_path) == []


def test_in_place_on_a_symlink_replaces_the_link_not_its_target(tmp_path):
    real, link = tmp_path / "real.pt", tmp_path / "link.pt"
    _nested(real)
    before = _sha(real)
    link.symlink_to(real)
    notes = _edit(load_checkpoint(link), link, in_place=True)
    assert any("symbolic link" in w for w in notes)
    assert not link.is_symlink() and _sha(real) == before
    _assert_tensors(torch.load(link, weights_only=True)["model"], _expected(_state(), "module."))


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    src, other, out = tmp_path / "in.pt", tmp_path / "other.bin", tmp_path / "out.pt"
    _nested(src)
    other.write_bytes(b"keep me")
    out.symlink_to(other)
    _edit(load_checkpoint(src), out)
    assert other.read_bytes() == b"keep me" and not out.is_symlink()


def test_missing_folder_or_folder_target(tmp_path):
    src = tmp_path / "in.pt"
    _nested(src)
    ckpt = load_checkpoint(src)
    with pytest.raises(UsageError, match="does not exist"):
        _edit(ckpt, tmp_path / "nope" / "out.pt")
    with pytest.raises(UsageError, match="is a folder"):
        _edit(ckpt, tmp_path)


# -- atomicity ------------------------------------------------------------------------------------------


def test_exception_mid_write_leaves_nothing(tmp_path, monkeypatch):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    _nested(src)
    before = _sha(src)
    ckpt = load_checkpoint(src)
    seen = []

    def broken_save(obj, f, **kwargs):
        seen.extend(_leftovers(tmp_path))
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _edit(ckpt, out)
    assert len(seen) == 1 and seen[0].startswith(".out.pt" + TMP_MARKER)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert _sha(src) == before

    out.write_bytes(b"an older output")  # an existing target is left as it was
    with pytest.raises(RuntimeError):
        _edit(ckpt, out)
    assert out.read_bytes() == b"an older output" and _leftovers(tmp_path) == []


def test_exception_in_safetensors_write_leaves_nothing(tmp_path, monkeypatch):
    src, out = tmp_path / "in.pt", tmp_path / "out.safetensors"
    _nested(src)

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _edit(load_checkpoint(src), out)
    assert not out.exists() and _leftovers(tmp_path) == []


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from avdiag.load import load_checkpoint
    from avdiag.load.write import Provenance, write_checkpoint

    real_replace = os.replace
    def guarded_replace(a, b):  # the parent kills this process long before the rename could happen
        time.sleep(60)
        real_replace(a, b)
    os.replace = guarded_replace

    ckpt = load_checkpoint(sys.argv[1])
    write_checkpoint(ckpt, {"w0": torch.zeros(4)}, Path(sys.argv[2]),
                     provenance=Provenance("reinit", {}, None, "0.1.0"))
""")


@pytest.mark.slow
def test_sigkill_during_write_leaves_input_and_target_alone(tmp_path):
    src, out = tmp_path / "big.pt", tmp_path / "out.pt"
    n = 25_000_000  # 3 x 100 MB, so that writing takes a moment
    torch.save({"model": {f"w{i}": torch.full((n,), float(i)) for i in range(3)}, "epoch": 1}, src)
    before = _sha(src)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the writer never created its temporary file"
            temps = [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]
            if temps and temps[0].stat().st_size > 0:
                break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(name.startswith(".out.pt" + TMP_MARKER) for name in _leftovers(tmp_path))
    assert _sha(src) == before

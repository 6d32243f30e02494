"""Datasets for the activation probe: research layouts, tensor files, folders, synthetic, AV digits.

:func:`open_dataset` turns a spec string into an :class:`AVDataset`:

* ``cremad:ROOT``, ``vggsound:ROOT``, ``ks:ROOT``, ``ave:ROOT``: research layouts (:mod:`.research`),
  detected from the files; ``NAME:ROOT,audio=DIR,frames=DIR,list=FILE`` names the folders (``{split}``
  in them becomes train/test);
* ``cremad`` (a bare research name, or ``avdigits``): the folder ``$AVDIAG_DATA/cremad``;
* ``avdigits:DIR``: a folder written by :func:`build_avdigits` (:mod:`.avdigits`);
* ``PATH.npz``, ``PATH.safetensors``: a tensor file (:mod:`.tensors`);
* ``DIR``, an existing folder: image or wav class folders (:mod:`.folders`); a folder holding
  ``avdigits.json`` opens as AV digits;
* ``synthetic[:k=v,...]``: seeded synthetic data (:mod:`.synthetic`);
* ``pkg.module:factory``: ``factory()`` (or ``factory(split=...)`` when it takes ``split``)
  returning a torch Dataset, adapted by :class:`~avdiag.data.base.AdaptedDataset`.

Precedence: ``synthetic``, then the research and ``avdigits`` prefixes, then bare names (so a
local folder called ``cremad`` must be written ``./cremad``), then paths, then factories:
``NAME:REST`` is a factory only when it is not an existing path and NAME is an importable dotted
module name. Items are dicts
``{"audio": (F, T), "visual": (3, T, H, W), "label": int, "index": int}`` (absent modalities are
left out); :func:`collate` and :func:`make_loader` batch them. Every problem is a one-line
:class:`DataError` (exit code 2). Rows a reader leaves out (missing or damaged files) are logged, never
silently dropped: ``dataset.report()["skipped"]``; ``DataOptions(strict=True)`` makes them errors.
``DataOptions(audio_start=...)`` is accepted by the readers that crop wav audio (``cremad``,
``vggsound``) and refused by the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path

from avdiag.data.avdigits import AVDigits, build_avdigits
from avdiag.data.base import (
    AdaptedDataset, AVDataLoader, AVDataset, DataError, DataOptions, check_split, collate,
    make_loader, sample_indices,
)
from avdiag.data.folders import FolderDataset
from avdiag.data.research import RESEARCH_NAMES, open_research
from avdiag.data.synthetic import SyntheticDataset
from avdiag.data.tensors import TENSOR_SUFFIXES, TensorFileDataset, save_tensor_file

DATA_ENV = "AVDIAG_DATA"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_FACTORY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _data_root(name: str) -> Path:
    base = os.environ.get(DATA_ENV)
    if not base:
        raise DataError(f"{name}: no folder given and ${DATA_ENV} is not set: write {name}:ROOT or "
                        f"set {DATA_ENV} to the folder that holds {name}/")
    root = Path(base).expanduser() / name
    if not root.is_dir():
        raise DataError(f"{name}: expected ${DATA_ENV}/{name} at {root}")
    return root


def _is_module_name(name: str) -> bool:
    if not _DOTTED.fullmatch(name):
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _open_factory(spec: str, module_name: str, attr: str, split: str) -> AVDataset:
    if not _FACTORY_NAME.fullmatch(attr):
        raise DataError(f"{spec}: expected pkg.module:factory, got factory name {attr!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any import error is reported, not raised
        raise DataError(f"{spec}: cannot import {module_name}: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DataError(f"{spec}: {module_name} has no callable {attr!r}")
    try:
        params = inspect.signature(factory).parameters
        takes_split = "split" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_split = False
    try:
        dataset = factory(split=split) if takes_split else factory()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{spec}: {attr}() failed: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}") from None
    if isinstance(dataset, AVDataset):
        return dataset
    return AdaptedDataset(dataset, split, spec)


def open_dataset(spec: str, *, split: str = "train", options: DataOptions = DataOptions()) -> AVDataset:
    """Open the dataset named by ``spec`` (see the module docstring) for ``split``."""
    check_split(split)
    options.validate()
    dataset = _open(spec.strip(), split, options)
    if options.audio_start is not None and not getattr(dataset, "crops_audio", False):
        raise DataError(f"{spec}: the audio start applies to the datasets that crop wav audio (cremad, "
                        f"vggsound), not to {dataset.name}")
    return dataset


def _open(spec: str, split: str, options: DataOptions) -> AVDataset:
    if not spec:
        raise DataError("empty dataset spec")
    head, sep, rest = spec.partition(":")
    if spec == "synthetic" or (head == "synthetic" and sep):
        return SyntheticDataset(rest, split, options, spec)
    if sep and head in RESEARCH_NAMES:
        if not rest:
            raise DataError(f"{spec}: expected {head}:ROOT")
        return open_research(head, rest, split, options, spec)
    if sep and head == "avdigits":
        return AVDigits(Path(rest).expanduser(), split, options, spec)
    if not sep and spec in RESEARCH_NAMES + ("avdigits",):
        root = _data_root(spec)
        if spec == "avdigits":
            return AVDigits(root, split, options, spec)
        return open_research(spec, root, split, options, spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() in TENSOR_SUFFIXES and not path.is_dir():
        if not path.exists():
            raise DataError(f"expected tensor file {path}")
        return TensorFileDataset(path, split, options, spec)
    if path.is_dir():
        if (path / "avdigits.json").is_file():
            return AVDigits(path, split, options, spec)
        return FolderDataset(path, split, options, spec)
    if path.exists():
        raise DataError(f"{spec}: a file avdiag cannot read as a dataset: expected .npz, "
                        ".safetensors or a folder")
    if sep and _is_module_name(head):
        return _open_factory(spec, head, rest, split)
    raise DataError(f"unknown dataset {spec!r}: expected cremad|vggsound|ks|ave[:ROOT], avdigits:DIR, "
                    "a .npz/.safetensors file, a folder, synthetic[:k=v,...] or pkg.module:factory")


__all__ = [
    "AVDataset", "AVDataLoader", "AVDigits", "DataError", "DataOptions", "FolderDataset",
    "SyntheticDataset", "TensorFileDataset", "build_avdigits", "collate", "make_loader",
    "open_dataset", "sample_indices", "save_tensor_file", "DATA_ENV",
]

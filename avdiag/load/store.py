"""A lazy, read-only view of a checkpoint's tensors: names, shapes and dtypes up front, data on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorStore:
    """Name -> tensor, where each tensor is read only when asked for (mmap or safetensors slice)."""

    def __init__(self) -> None:
        self._info: dict[str, TensorInfo] = {}
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}

    def add(self, name: str, info: TensorInfo, getter: Callable[[], torch.Tensor]) -> None:
        self._info[name] = info
        self._getters[name] = getter

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.add(name, TensorInfo(tuple(tensor.shape), tensor.dtype), lambda t=tensor: t)

    @classmethod
    def from_mapping(cls, tensors: dict[str, torch.Tensor]) -> "TensorStore":
        store = cls()
        for name, tensor in tensors.items():
            store.add_tensor(name, tensor)
        return store

    def renamed(self, rename: Callable[[str], str]) -> "TensorStore":
        out = TensorStore()
        for name in self._info:
            out.add(rename(name), self._info[name], self._getters[name])
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        return self._getters[name]()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._info.values())

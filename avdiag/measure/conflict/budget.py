"""The memory budget of the conflict measure and the chunk size it allows.

A batch is processed in chunks of samples. How many samples a chunk holds is not guessed: before
the first chunk of a run, one sample goes through the forward pass, and the bytes autograd saves
for the backward pass are counted (distinct storages, the model's parameters and buffers left
out), together with the module inputs and outputs the engine records and the gradients at those
outputs it holds at once. That is the measured memory of one sample; a chunk takes as many samples
as :data:`ACTIVATION_SHARE` of the budget holds, a quarter bounds the temporaries of one layer's
products (which split their work further when needed), and the last tenth is the margin for what
the count does not see (the backward pass's transient buffers, the allocator's slack: about a fifth
more than the count on ResNet-18 at 112 px).

:data:`DEFAULT_MAX_MEMORY` (2 GiB) keeps the peak resident memory of a full-size run (two
ResNet-18 encoders, 224 px frames, batch 64) under 3 GB on a CPU, and leaves most of a 24 GB
machine, or an 8 GB laptop, to everything else. On a GPU the budget bounds device memory, and the
default is half the device memory free at the start (:func:`default_budget`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from avdiag.errors import UsageError

DEFAULT_MAX_MEMORY = 2 * 2**30
GPU_SHARE = 0.5  # of the device memory free at the start: the default budget on a GPU
ACTIVATION_SHARE = 0.65  # of the budget, for a chunk's counted activations
TEMPORARIES_SHARE = 0.25  # for the temporaries of one layer's products; the rest is margin
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(value: str | int | float) -> int:
    """Bytes from ``2G``, ``1.5GiB``, ``512M``, ``800MB``, ``65536`` (binary units: 1G = 2**30);
    UsageError for anything else or for less than one MiB."""
    if isinstance(value, bool):
        raise UsageError(f"--max-memory: expected a size such as 2G or 512M, got {value!r}")
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?\s*", str(value).lower())
        if match is None:
            raise UsageError(f"--max-memory: expected a size such as 2G or 512M, got {value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size < 2**20:
        raise UsageError(f"--max-memory: {value!r} is less than 1 MiB")
    return size


def default_budget(device: torch.device | str) -> int:
    """The budget when none is given: :data:`DEFAULT_MAX_MEMORY` on a CPU; on a GPU, :data:`GPU_SHARE`
    of the device memory free now (at least the CPU default). Small chunks leave a GPU launch-bound:
    on an H200 at CREMA-D size, 2 GiB allows 6 samples a chunk and per-sample cosines 1.35x the loop's
    speed, 40 GiB the whole batch of 64 and 8.6x."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_MAX_MEMORY
    free, _ = torch.cuda.mem_get_info(device)
    return max(DEFAULT_MAX_MEMORY, int(free * GPU_SHARE))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


class SavedBytes:
    """Within the ``with`` block, the bytes of the distinct storages autograd saves for backward,
    leaving out ``exclude`` (the parameters and buffers, which are not per sample)."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.excluded = {storage_key(t) for t in exclude}
        self.storages: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = storage_key(t)
            if key not in self.excluded:
                self.storages[key] = t.untyped_storage().nbytes()
        return t

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors held outside autograd (recorded module inputs and outputs) as well."""
        for t in tensors:
            key = storage_key(t)
            if key not in self.excluded:
                self.storages[key] = t.untyped_storage().nbytes()

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def chunk_for(budget: int, per_sample_bytes: int, n: int) -> int:
    """Samples per chunk: as many as the activation share of ``budget`` holds (1 to ``n``)."""
    return max(1, min(n, int(budget * ACTIVATION_SHARE) // max(1, per_sample_bytes)))


def temporaries_budget(budget: int) -> int:
    """The share of ``budget`` left to the temporaries of one layer's products."""
    return max(1, int(budget * TEMPORARIES_SHARE))

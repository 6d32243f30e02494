"""The data a command runs a model on: a spec and its options -> one opened dataset and loader per split.

Every workflow that takes data takes a :class:`DataSource`. A dataset is opened once per split; with
``cache=True`` its batches are also decoded once and kept, so a command that runs several
checkpoints on the same data (``check --data``, a baseline comparison) reads every file once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from avdiag.errors import UsageError

VISUAL_LAYOUTS = ("BCTHW", "BTCHW")


@dataclass
class DataSource:
    """Where the data comes from and how it is batched and run.

    ``spec``: a data spec string (see :func:`avdiag.data.open_dataset`) or an already opened dataset.
    ``model``: ``package.module:factory`` to build the model with (default: resolve it from the
    checkpoint); ``visual_layout``: how that factory wants clips, BCTHW or BTCHW. ``device``: auto,
    cpu or cuda[:N]. ``limit``: at most this many samples, a seeded random subset. ``options``:
    preprocessing (:class:`avdiag.data.DataOptions`). ``amp``: autocast on GPU (bfloat16 where supported).
    ``tf32``: allow TF32 on GPU (faster; default full float32). ``float64``: run the model and the
    measurements in float64, the reference that tells a float32 rounding effect (a fire rate or a
    cosine that moves between devices) from a real one; slower, and much slower on most GPUs.
    ``cache``: keep decoded batches for reuse (they are then not pinned: a cached dataset must not
    lock host memory). ``strict_data``: a row the
    reader would skip (missing or damaged files, too few frames) is an error instead.

    After a run, :meth:`report` says what the data gave (items and the rows left out, per split) and
    :meth:`clip_ids` names the samples.
    """

    spec: Any
    split: str = "train"
    options: Any = None
    model: str | None = None
    visual_layout: str | None = None
    device: str = "auto"
    batch_size: int = 32
    limit: int | None = None
    num_workers: int = 0
    seed: int = 0
    amp: bool = False
    tf32: bool = False
    float64: bool = False
    cache: bool = False
    strict_data: bool = False
    _datasets: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _batches: dict[str, list] = field(default_factory=dict, init=False, repr=False, compare=False)
    _device: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.visual_layout is not None and self.visual_layout not in VISUAL_LAYOUTS:
            raise UsageError(f"--visual-layout is BCTHW or BTCHW, got {self.visual_layout!r}")
        if self.visual_layout is not None and self.model is None:
            raise UsageError("--visual-layout is for a --model factory (built-in models take (B,3,T,H,W))")
        if isinstance(self.spec, str) and not self.spec.strip():
            raise UsageError("--data: empty dataset spec")
        if self.float64 and (self.amp or self.tf32):
            raise UsageError(f"--float64 and {'--amp' if self.amp else '--tf32'} contradict each other: choose one")
        self._device = pick_device(self.device)  # a bad --device is refused before any data is read

    @property
    def name(self) -> str:
        if not isinstance(self.spec, str):
            return getattr(self.spec, "name", type(self.spec).__name__)
        return getattr(self.dataset(), "name", self.spec)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(getattr(self.dataset(), "modalities", ("audio", "visual")))

    def dataset(self, split: str | None = None):
        """The dataset of ``split`` (default: ``self.split``), opened on first use."""
        split = split or self.split
        if not isinstance(self.spec, str):
            return self.spec
        if split not in self._datasets:
            from avdiag.data import open_dataset

            self._datasets[split] = open_dataset(self.spec, split=split, options=self.data_options())
        return self._datasets[split]

    def data_options(self):
        """The preprocessing options the datasets are opened with (``strict_data`` included)."""
        from avdiag.data import DataOptions

        options = self.options or DataOptions()
        return replace(options, strict=True) if self.strict_data else options

    def clip_ids(self, split: str | None = None) -> dict[int, str]:
        """Dataset index -> clip name (its id in the list file, or its file name) for the samples the
        loader visits; empty when the dataset's items have no names (synthetic data, tensor files)."""
        from avdiag.data import sample_indices

        dataset = self.dataset(split)
        clip_id = getattr(dataset, "clip_id", None)
        if clip_id is None or len(dataset) == 0 or clip_id(0) is None:
            return {}
        return {i: clip_id(i) for i in sample_indices(len(dataset), self.limit, self.seed)}

    def skipped_rows(self) -> list[dict[str, Any]]:
        """Every row the opened splits left out so far (all of them, not only the first shown in a report)."""
        return [r for ds in self._opened().values() if hasattr(ds, "skip_log") for r in ds.skip_log.rows]

    def add_skipped(self, rows: list[dict[str, Any]]) -> None:
        """Record rows another process found unusable (a torchrun rank reading other batches)."""
        for record in rows:
            dataset = self._opened().get(record.get("split"))
            if dataset is not None and hasattr(dataset, "skip_log"):
                dataset.skip_log.add_record(record)

    def _opened(self) -> dict[str, Any]:
        return self._datasets if isinstance(self.spec, str) else {self.split: self.spec}

    def report(self) -> dict[str, Any]:
        """What the data gave: per opened split its layout, rows listed, items and rows skipped; and
        ``skipped`` (``count``, ``by_kind``, the first ``rows`` with split, row, clip, reason) over all."""
        from avdiag.data.base import skipped_dict

        splits = {split: ds.report() for split, ds in self._opened().items() if hasattr(ds, "report")}
        rows = [r for split in splits.values() for r in split["skipped"]["rows"]]
        skipped = skipped_dict(rows)
        skipped["count"] = sum(split["skipped"]["count"] for split in splits.values())
        skipped["by_kind"] = _summed([split["skipped"]["by_kind"] for split in splits.values()])
        return {"spec": self.spec if isinstance(self.spec, str) else repr(self.spec),
                "strict": self.strict_data, "splits": splits, "skipped": skipped}

    def has_split(self, split: str) -> bool:
        """Whether ``split`` can be opened (a tensor file or a factory has only the data it holds)."""
        return isinstance(self.spec, str)

    def n_samples(self, split: str | None = None) -> int:
        n = len(self.dataset(split))
        return min(n, self.limit) if self.limit else n

    def loader(self, split: str | None = None):
        """Batches of ``split``: a deterministic DataLoader, or the decoded batches kept from the first
        pass when ``cache`` is set."""
        split = split or self.split
        if split in self._batches:
            return self._batches[split]
        from avdiag.data import make_loader

        loader = make_loader(self.dataset(split), batch_size=self.batch_size, num_workers=self.num_workers,
                             limit=self.limit, seed=self.seed, device=None if self.cache else self._device,
                             dtype=self.dtype)
        if not self.cache:
            return loader
        self._batches[split] = list(loader)
        return self._batches[split]

    def torch_device(self):
        return self._device

    @property
    def dtype(self):
        """The floating dtype the model and the batches run in: float32, or float64 with ``float64``."""
        import torch

        return torch.float64 if self.float64 else torch.float32

    @property
    def precision(self) -> str:
        """How the model runs, as reports name it: float32, float64, amp or tf32."""
        return "float64" if self.float64 else "amp" if self.amp else "tf32" if self.tf32 else "float32"


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for key, n in c.items():
            total[key] = total.get(key, 0) + n
    return total


def pick_device(name: str):
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` with N a present GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: avdiag runs on cpu or cuda[:N]")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError("--device cuda: no CUDA device is available here")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device

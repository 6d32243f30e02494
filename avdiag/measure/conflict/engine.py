"""One batch through the conflict measure, in chunks of samples under a memory budget.

In eval mode every sample's gradients are independent of the others in its batch, so a batch is
processed a chunk at a time (:mod:`~avdiag.measure.conflict.budget` sizes the chunks from the
measured memory of one sample): per chunk one forward of both encoders, the head pass, and per
encoder the backward passes and per-sample products (:mod:`~avdiag.measure.conflict.hooks`, or a
whole-encoder engine of :mod:`~avdiag.measure.conflict.per_sample`). What the per-batch figures
need adds up over the chunks: each chunk's losses and gradients are weighted by its share of the
batch, so the sums are the batch-mean loss and its gradients (up to float summation order).

In train mode (BatchNorm on batch statistics) a sample's gradient depends on the whole batch: the
per-batch figures then come from one pass over the whole batch, with the memory of a training
step, and the per-sample cosines (always eval mode) from a chunked pass of their own.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from avdiag.measure.conflict.budget import SavedBytes, chunk_for, temporaries_budget
from avdiag.measure.conflict.gradients import (
    MODALITIES, Encoder, HeadPass, head_pass, head_products, shared_masks, tensor_products,
)
from avdiag.measure.conflict.hooks import Capture, EngineUnsupported, module_products
from avdiag.measure.conflict.layers import BatchGrads
from avdiag.measure.conflict.per_sample import encoder_products
from avdiag.measure.conflict.products import cosine, f32, unit_rows
from avdiag.measure.conflict.results import EngineReport, SketchReport
from avdiag.measure.conflict.select import Selector
from avdiag.measure.conflict.sketch import CHECK_SAMPLES, Sketch
from avdiag.measure.precision import amp_dtype_name, autocast
from avdiag.models.parts import AVParts

@dataclass
class BatchSums:
    """What the chunks of one batch add up to for its per-batch figures."""

    losses: dict[str, float] = field(default_factory=lambda: {"multimodal": 0.0, "audio": 0.0, "visual": 0.0})
    head: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    grads: BatchGrads = field(default_factory=BatchGrads)

    def add_head(self, head: HeadPass, share: float) -> None:
        for k, v in head.losses.items():
            self.losses[k] += v * share
        if head.head_grads is None:
            return
        scaled = tuple([g * share for g in gs] for gs in head.head_grads)
        if self.head is None:
            self.head = scaled
        else:
            self.head = tuple([a + b for a, b in zip(acc, new)] for acc, new in zip(self.head, scaled))


@dataclass
class BatchRecord:
    """A batch's per-batch inputs to :func:`~avdiag.measure.conflict.mmpareto.encoder_figures`."""

    losses: dict[str, float]
    per_tensor: dict[str, list[list[float]]]  # modality -> per-tensor [<g1, g2>, |g1|^2, |g2|^2]
    head: tuple[float, float, float] | None


class Engine:
    """The state of one measurement over many batches: the encoders, how each computes per-sample
    products, the chunk plans, the layer choices, the sketch and its error check."""

    def __init__(self, parts: AVParts, encs: dict[str, Encoder], head_params: list[nn.Parameter],
                 device: torch.device, kinds: dict[str, str], memory_bytes: int, *,
                 layer_method: str | None = None, sketch: Sketch | None = None, amp: bool = False):
        self.parts, self.encs, self.head_params, self.device = parts, encs, head_params, device
        self.kinds = dict(kinds)  # modality -> "hooks" / "vmap" / "loop"
        self.memory_bytes = int(memory_bytes)
        self.selector = Selector(layer_method, sketch)
        self.sketch = sketch
        self.amp = amp
        self.masks: list[torch.Tensor | None] | None = None
        self.plans: dict[Any, int] = {}
        self.per_sample_bytes: int | None = None
        self.largest_chunk: int | None = None
        self.kinds_used: set[tuple[str, str]] = set()
        self.sketch_errors: list[float] = []
        self.fixed = [*parts.model.parameters(), *parts.model.buffers()]
        # the per-layer products size their temporaries in float32 elements: a float64 model's are twice
        # the bytes, so they get half the elements
        wide = any(p.dtype == torch.float64 for p in parts.model.parameters())
        self.temporaries = temporaries_budget(self.memory_bytes) // (2 if wide else 1)

    # ---- reports ---------------------------------------------------------------------------------

    def report(self) -> EngineReport:
        per_sample = {}
        for m in MODALITIES:
            used = sorted(kind for mod, kind in self.kinds_used if mod == m)
            if used:
                per_sample[m] = "+".join(used)
        trials = {layer: {m: round(t, 9) for m, t in times.items()} for layer, times in self.selector.trials.items()}
        return EngineReport(per_sample, dict(self.selector.choices), trials, self.memory_bytes,
                            self.per_sample_bytes, self.largest_chunk, amp_dtype_name(self.device, self.amp))

    def sketch_report(self) -> SketchReport | None:
        if self.sketch is None:
            return None
        errors = self.sketch_errors
        return SketchReport(self.sketch.dim, self.sketch.seed, len(errors), max(errors, default=math.nan),
                            math.fsum(errors) / len(errors) if errors else math.nan)

    @property
    def methods(self) -> set[str]:
        """Per-sample methods used so far ("hooks" reads "sketch" when sketching)."""
        return {("sketch" if kind == "hooks" and self.sketch is not None else kind) for _, kind in self.kinds_used}

    # ---- passes ----------------------------------------------------------------------------------

    def eval_batch(self, inputs: dict[str, torch.Tensor], y: torch.Tensor, with_samples: bool,
                   with_batch: bool) -> tuple[BatchRecord | None, dict[str, torch.Tensor] | None]:
        """Eval-mode chunks of one batch: its per-batch record (``with_batch``) and per-sample
        products, (n, 3) per modality (``with_samples``)."""
        self.parts.model.eval()
        n = int(y.shape[0])
        sums = BatchSums()
        products: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
        key = (tuple((m, tuple(inputs[m].shape[1:])) for m in MODALITIES), with_samples)
        if key not in self.plans:
            self.per_sample_bytes = max(self.per_sample_bytes or 0, self._probe(inputs, with_samples))
            self.plans[key] = chunk_for(self.memory_bytes, self.per_sample_bytes, 2**31)
        step = self.plans[key]
        for start in range(0, n, step):
            end = min(n, start + step)
            self.largest_chunk = max(self.largest_chunk or 0, end - start)
            chunk = {m: inputs[m][start:end] for m in MODALITIES}
            self._chunk(chunk, y[start:end], (end - start) / n, sums, products, with_samples, with_batch)
        record = self._record(sums) if with_batch else None
        return record, ({m: torch.cat(p) for m, p in products.items()} if with_samples else None)

    def _probe(self, inputs: dict[str, torch.Tensor], with_samples: bool) -> int:
        """The memory one sample takes in a chunk: a forward of the batch's first sample, counting
        what autograd saves, what the hooks record and the output gradients held at once."""
        hooked = {m: e for m, e in self.encs.items() if with_samples and self.kinds[m] == "hooks"}
        with ExitStack() as stack:
            caps = {m: Capture(e, stack) for m, e in hooked.items()}
            with SavedBytes(self.fixed) as saved, autocast(self.device, self.amp):
                self.parts.features({m: inputs[m][:1] for m in MODALITIES})
        held = 0
        for cap in caps.values():
            saved.add(cap.tensors())
            held += 2 * sum(call.output.untyped_storage().nbytes() for calls in cap.calls for call in calls)
        return saved.total + held

    def _chunk(self, chunk: dict[str, torch.Tensor], y: torch.Tensor, share: float, sums: BatchSums,
               products: dict[str, list[torch.Tensor]], with_samples: bool, with_batch: bool) -> None:
        """One chunk: its share of the batch sums and its per-sample products."""
        hooked = {m: e for m, e in self.encs.items() if with_samples and self.kinds[m] == "hooks"}
        with ExitStack() as stack:
            caps = {m: Capture(e, stack) for m, e in hooked.items()}
            with autocast(self.device, self.amp):
                feats = self.parts.features(chunk)
        feats = {m: f32(f) for m, f in feats.items()}
        if self.masks is None:
            self.masks = shared_masks(self.parts, self.head_params, feats)
        head = head_pass(self.parts, feats, y, self.head_params, self.masks if with_batch else None)
        sums.add_head(head, share)
        check = self.sketch is not None and len(self.sketch_errors) < 2 * CHECK_SAMPLES
        for m, enc in self.encs.items():
            cot1, cot2 = head.cot_mm[m], head.cot_uni[m]
            if not with_samples:
                self._autograd_grads(enc, feats[m], cot1 * share, cot2 * share, sums.grads)
                continue
            (c1, inv1), (c2, inv2) = unit_rows(cot1), unit_rows(cot2)
            sums.grads.start_chunk(inv1 * share, inv2 * share)
            grads = sums.grads if with_batch else None
            got = self._hooks(m, enc, caps, feats[m], c1, c2, grads, check)
            if got is None:
                got = self._whole_encoder(m, enc, chunk[m], c1.detach(), c2.detach())
                if with_batch:
                    self._autograd_grads(enc, feats[m], cot1 * share, cot2 * share, sums.grads)
            self.kinds_used.add((m, self.kinds[m]))
            products[m].append(got)

    def _whole_encoder(self, m: str, enc: Encoder, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        """Encoder ``m``'s products by vmap, or by the loop (for the rest of the run) where an operation
        of the encoder has no batching rule."""
        try:
            return encoder_products(self.kinds[m], enc, x, c1, c2, self.temporaries)
        except RuntimeError as e:
            if self.kinds[m] != "vmap" or isinstance(e, torch.OutOfMemoryError):
                raise
            self.kinds[m] = "loop"
            return encoder_products("loop", enc, x, c1, c2, self.temporaries)

    def _hooks(self, m: str, enc: Encoder, caps: dict[str, Capture], feature: torch.Tensor, c1: torch.Tensor,
               c2: torch.Tensor, grads: BatchGrads | None, check: bool) -> torch.Tensor | None:
        """Encoder ``m``'s products by the hooks engine; None (and the encoder moved to vmap for the
        rest of the run) where it does not apply."""
        if m not in caps:
            return None
        try:
            got, exact = module_products(enc, caps[m], feature, c1, c2, self.selector,
                                         self.temporaries, grads, check)
        except EngineUnsupported:
            self.kinds[m] = "vmap"
            return None
        if exact is not None:
            self._check_sketch(got, exact)
        return got

    def _check_sketch(self, sketched: torch.Tensor, exact: torch.Tensor) -> None:
        for (d, n1, n2), (e, m1, m2) in zip(sketched.cpu().tolist(), exact.cpu().tolist()):
            a, b = cosine(d, n1, n2), cosine(e, m1, m2)
            if math.isfinite(a) and math.isfinite(b):
                self.sketch_errors.append(abs(a - b))

    @staticmethod
    def _autograd_grads(enc: Encoder, feature: torch.Tensor, cot1: torch.Tensor, cot2: torch.Tensor,
                        grads: BatchGrads) -> None:
        """Add the batch gradients of ``enc``'s parameters for two cotangents at ``feature`` (frees
        its graph)."""
        g1 = torch.autograd.grad(feature, enc.params, cot1, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(feature, enc.params, cot2, allow_unused=True)
        for p, a, b in zip(enc.params, g1, g2):
            grads.add_sum(p, torch.zeros_like(p) if a is None else a, torch.zeros_like(p) if b is None else b)

    def train_batch(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> BatchRecord:
        """The per-batch record with BatchNorm in train mode: one pass over the whole batch."""
        self.parts.model.train(True)
        with autocast(self.device, self.amp):
            feats = self.parts.features(inputs)
        feats = {m: f32(f) for m, f in feats.items()}
        if self.masks is None:
            self.masks = shared_masks(self.parts, self.head_params, feats)
        head = head_pass(self.parts, feats, y, self.head_params, self.masks)
        sums = BatchSums()
        sums.add_head(head, 1.0)
        for m, enc in self.encs.items():
            self._autograd_grads(enc, feats[m], head.cot_mm[m], head.cot_uni[m], sums.grads)
        return self._record(sums)

    def _record(self, sums: BatchSums) -> BatchRecord:
        per_tensor = {}
        for m, enc in self.encs.items():
            pairs = [sums.grads.get(p) for p in enc.params]
            per_tensor[m] = tensor_products([a for a, _ in pairs], [b for _, b in pairs], enc.params).cpu().tolist()
        head = head_products(sums.head) if sums.head is not None else None
        return BatchRecord(dict(sums.losses), per_tensor, head)

"""MMPareto's gradient conflict (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent
Unimodal Assistance", ICML 2024), PCGrad's projection, the head cosine and the per-sample cosine,
over the batches: :func:`measure`.

Per mini-batch and modality ``m``, with ``g1 = g_mm`` (gradient of ``CE(fused logits, y)``) and
``g2 = g_m`` (gradient of ``CE(uni-modal logits of m, y)``), both batch means and taken with respect
to every parameter of encoder ``m`` flattened together:

* ``cos = <g1, g2> / (|g1| |g2|)``; the batch *conflicts* when ``cos <= 0``;
  ``magnitude_ratio = |g2| / |g1|``.
* MMPareto's weights (:func:`mmpareto_weights`): under conflict the two-task min-norm (MGDA)
  solution ``a1 = clip((|g2|^2 - <g1, g2>) / |g1 - g2|^2, 0.001, 0.999)``, ``a2 = 1 - a1``; else
  ``(0.5, 0.5)``. MMPareto then sets, per parameter tensor ``t``, the gradient
  ``gamma * max(1, |g1_t + g2_t| / |g_hat_t|) * g_hat_t`` with ``g_hat = 2 a1 g1 + 2 a2 g2`` and
  ``gamma = 1.5`` (the authors' code; ``g1 + g2`` is the gradient of their summed loss). Reported:
  ``mmpareto_scale``, that factor for the whole flattened encoder (:func:`mmpareto_scale`), and
  ``mmpareto_tensor_scale``, the (min, max) of the per-tensor factors. Without conflict every
  factor is exactly ``gamma``.
* PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, :func:`pcgrad`):
  when ``<g1, g2> < 0``, ``g_pc = g1 - <g1, g2> / |g2|^2 * g2``; reported ``|g_pc|`` and
  ``cos(g_pc, g1)`` (``|g1|`` and 1 when nothing is projected).
* Per layer: the cosine restricted to the parameters of one module, keyed by its qualified name
  (a BatchNorm's weight and bias together, a convolution's weight and bias together).
* On the shared head, between the modalities: the cosine of the gradients of ``CE(out_a, y)`` and
  ``CE(out_v, y)`` over the head parameter elements both uni-modal logits depend on (probed once
  per run with random features). A concat head sliced into uni-modal logits shares its bias only;
  separate uni-modal heads or a sum head share nothing: ``head_cos`` is then None.

Per sample: ``cos(grad CE_i(fused), grad CE_i(uni-modal m))`` on encoder ``m``, the sample-level
view of cross-modality gradient harmonisation (Wu et al., NeurIPS 2022; they pair two alignment
losses on shared parameters, here the fused and the uni-modal classification losses), where a
negative cosine marks a conflicting, likely noisy or misaligned sample. Taken in EVAL mode (samples
independent of their batch) by the engines of :mod:`avdiag.measure.conflict.per_sample`, a chunk
of samples at a time within a memory budget (:mod:`avdiag.measure.conflict.engine`). With
``per_sample=True`` and ``train_mode=False`` the per-batch figures come from the same passes as the
per-sample ones (the batch gradient is the sum of the per-sample gradients).

:class:`ConflictMeter` measures a stream of batches one at a time (the whole dataset never has to
be held); :func:`measure` runs it over an iterable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from avdiag.errors import DataError, ModelError
from avdiag.locate.resolve import is_out_of_memory, move_module
from avdiag.measure.conflict.budget import default_budget, format_bytes
from avdiag.measure.conflict.engine import BatchRecord, Engine
from avdiag.measure.conflict.gradients import MODALITIES, Encoder, ModelState, encoder_info
from avdiag.measure.conflict.hooks import hooks_apply
from avdiag.measure.conflict.per_sample import ENGINES
from avdiag.measure.conflict.products import cosine
from avdiag.measure.conflict.results import BatchConflict, BatchModalityConflict, GradientConflict, SampleConflict
from avdiag.measure.conflict.sketch import Sketch
from avdiag.measure.precision import full_fp32
from avdiag.models.parts import AVParts

MMPARETO_GAMMA = 1.5
MMPARETO_CLIP = (0.001, 0.999)

__all__ = ["ConflictMeter", "MMPARETO_GAMMA", "cosine", "encoder_figures", "measure", "mmpareto_scale",
           "mmpareto_weights", "pcgrad"]


# ---- the formulas, over |g1|^2, <g1, g2>, |g2|^2 ------------------------------------------------


def mmpareto_weights(n1: float, dot: float, n2: float) -> tuple[float, float]:
    """MMPareto's loss weights (a1 for g1 = g_mm, a2 for g2 = g_m) from ``|g1|^2``, ``<g1, g2>``,
    ``|g2|^2``: the clipped two-vector min-norm solution when ``cos <= 0``, else (0.5, 0.5)."""
    if not cosine(dot, n1, n2) <= 0:
        return 0.5, 0.5
    a1 = (n2 - dot) / (n1 + n2 - 2.0 * dot)
    a1 = min(MMPARETO_CLIP[1], max(MMPARETO_CLIP[0], a1))
    return a1, 1.0 - a1


def mmpareto_scale(n1: float, dot: float, n2: float, a1: float, a2: float, gamma: float) -> float:
    """``gamma * max(1, |g1 + g2| / |2 a1 g1 + 2 a2 g2|)``."""
    hat = 4.0 * (a1 * a1 * n1 + 2.0 * a1 * a2 * dot + a2 * a2 * n2)
    if not hat > 0:
        return gamma  # a zero combined gradient: the authors' division gives NaN and falls back to gamma
    return gamma * max(1.0, math.sqrt(max(n1 + 2.0 * dot + n2, 0.0) / hat))


def pcgrad(n1: float, dot: float, n2: float) -> tuple[float, float]:
    """PCGrad's ``(|g_pc|, cos(g_pc, g1))``: g1 projected off g2 when ``<g1, g2> < 0``."""
    if dot < 0 and n2 > 0:
        norm = math.sqrt(max(n1 - dot * dot / n2, 0.0))
        return norm, (norm / math.sqrt(n1) if n1 > 0 else math.nan)
    return math.sqrt(n1), (1.0 if n1 > 0 else math.nan)


def encoder_figures(per_tensor: list[list[float]], enc: Encoder, gamma: float) -> BatchModalityConflict:
    """The figures of one encoder on one batch from its per-tensor ``[<g1, g2>, |g1|^2, |g2|^2]``."""
    layer_sums = [[0.0, 0.0, 0.0] for _ in enc.layers]
    for (d, n1, n2), owner in zip(per_tensor, enc.owners):
        acc = layer_sums[owner]
        acc[0] += d
        acc[1] += n1
        acc[2] += n2
    dot, n1, n2 = (math.fsum(r[i] for r in per_tensor) for i in range(3))
    cos = cosine(dot, n1, n2)
    a1, a2 = mmpareto_weights(n1, dot, n2)
    tensor_scales = [mmpareto_scale(t1, td, t2, a1, a2, gamma) for td, t1, t2 in per_tensor]
    pc_norm, pc_cos = pcgrad(n1, dot, n2)
    return BatchModalityConflict(
        cos, bool(cos <= 0), math.sqrt(n1), math.sqrt(n2),
        math.sqrt(n2) / math.sqrt(n1) if n1 > 0 else math.nan, (a1, a2),
        mmpareto_scale(n1, dot, n2, a1, a2, gamma),
        (min(tensor_scales), max(tensor_scales)) if tensor_scales else (math.nan, math.nan),
        pc_norm, pc_cos, {name: cosine(*s) for name, s in zip(enc.layers, layer_sums)})


def sample_cosines(products: torch.Tensor) -> list[float]:
    return [cosine(d, n1, n2) for d, n1, n2 in products.cpu().tolist()]


# ---- the measurement ----------------------------------------------------------------------------


def _batch_inputs(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch on ``device``; tensors made under inference mode (a loader pulled by an inference
    pass) are copied, since autograd cannot save them."""
    missing = [m for m in MODALITIES if m not in batch]
    if missing:
        raise DataError(f"conflict needs both modalities; the batch has no {', '.join(missing)}")

    def usable(t: Any) -> torch.Tensor:
        t = torch.as_tensor(t).to(device, non_blocking=True)
        return t.clone() if t.is_inference() else t

    return {m: usable(batch[m]) for m in MODALITIES}, usable(batch["label"]).long()


def _engines(method: str, encs: dict[str, Encoder], sample_major_rows: bool = True) -> dict[str, str]:
    """The per-sample engine of each encoder."""
    if method not in ("auto", *ENGINES):
        raise ValueError(f"method must be auto, {', '.join(ENGINES)}; got {method!r}")
    if method == "hooks" and not all(hooks_apply(e) for e in encs.values()):
        raise ValueError("the hooks engine needs encoders whose parameters each belong to one module")
    if method == "auto":
        # An adapter model's encoder may lay a sample's rows out in any order (frames first, tokens...),
        # which the hooks engine cannot see; vmap over whole samples is exact whatever the layout.
        return {m: "hooks" if hooks_apply(e) and sample_major_rows else "vmap" for m, e in encs.items()}
    return {m: method for m in encs}


class ConflictMeter:
    """MMPareto / PCGrad / head / per-sample gradient conflict, one batch at a time.

    ``meter.add(batch)`` measures a batch (dicts with ``audio`` (B, F, T), ``visual``
    (B, 3, T, H, W), ``label`` (B,) and, ideally, ``index`` (B,) dataset indices, else positions in
    the stream); ``meter.result()`` gives the :class:`GradientConflict` so far. Options as
    :func:`measure`. Each ``add`` restores the model's train/eval flags, buffers and requires_grad
    flags before it returns and leaves ``.grad`` alone, so it can run inside another pass over the
    same model (it leaves inference mode for its own passes).
    """

    def __init__(self, parts: AVParts, device: torch.device | str = "cpu", per_sample: bool = True,
                 train_mode: bool = False, *, method: str = "auto", gamma: float = MMPARETO_GAMMA,
                 memory_bytes: int | None = None, layer_method: str | None = None, sketch: int | None = None,
                 sketch_seed: int = 0, amp: bool = False, tf32: bool = False, top_k: int = 10):
        self.device = torch.device(device)
        self.tf32 = tf32
        self.parts = parts
        self.per_sample, self.train_mode, self.gamma = per_sample, bool(train_mode), gamma
        model = move_module(parts.model, self.device)
        self.encs = {m: encoder_info(model, m, parts.encoders[m], parts.feature_fns[m]) for m in MODALITIES}
        kinds = _engines(method, self.encs, parts.sample_major_rows)
        enc_ids = {id(p) for e in self.encs.values() for p in e.params}
        head_params = [p for p in model.parameters() if id(p) not in enc_ids]
        budget = default_budget(self.device) if memory_bytes is None else memory_bytes
        self.engine = Engine(parts, self.encs, head_params, self.device, kinds, budget,
                             layer_method=layer_method, sketch=Sketch(sketch, sketch_seed) if sketch else None,
                             amp=amp)
        self.kinds = kinds
        self._result = GradientConflict(parts.unimodal_source, self.train_mode, None, gamma, 0,
                                        {m: list(e.layers) for m, e in self.encs.items()}, top_k=top_k)
        self.seen = 0

    def add(self, batch: dict[str, Any]) -> int:
        """Measure one batch; the number of samples in it."""
        try:
            with torch.inference_mode(False), torch.enable_grad(), full_fp32(self.device, enabled=not self.tf32), \
                    ModelState(self.parts.model, save_buffers=self.train_mode) as state:
                return self._add(batch, state)
        except Exception as e:
            if is_out_of_memory(e):
                where = "GPU" if self.device.type == "cuda" else "host"
                raise ModelError(f"out of {where} memory measuring gradient conflict within a budget of "
                                 f"{format_bytes(self.engine.memory_bytes)}: lower --max-memory") from e
            raise

    def _add(self, batch: dict[str, Any], state: ModelState) -> int:
        inputs, y = _batch_inputs(batch, self.device)
        n = int(y.shape[0])
        index = batch.get("index")
        index = torch.as_tensor(index).long().tolist() if index is not None else list(range(self.seen, self.seen + n))
        self.seen += n
        samples = None
        if self.train_mode:
            record = self.engine.train_batch(inputs, y)
            state.reset_buffers()  # undo the running-statistics update of a train-mode forward
            if self.per_sample:
                samples = self.engine.eval_batch(inputs, y, with_samples=True, with_batch=False)[1]
        else:
            record, samples = self.engine.eval_batch(inputs, y, self.per_sample, with_batch=True)
        if not self._result.batches:
            self._result.head_shared = int(sum(int(mk.sum()) for mk in self.engine.masks if mk is not None))
        if samples is not None:
            cos = {m: sample_cosines(p) for m, p in samples.items()}
            self._result.samples.extend(SampleConflict(i, lab, ca, cv) for i, lab, ca, cv
                                        in zip(index, y.tolist(), cos["audio"], cos["visual"]))
        self._result.batches.append(self._batch(record, len(self._result.batches), n, index))
        return n

    def _batch(self, record: BatchRecord, position: int, n: int, index: list[int]) -> BatchConflict:
        figures = {m: encoder_figures(record.per_tensor[m], enc, self.gamma) for m, enc in self.encs.items()}
        return BatchConflict(position, n, min(index) if index else self.seen - n, record.losses["multimodal"],
                             {m: record.losses[m] for m in MODALITIES}, figures,
                             None if record.head is None else cosine(*record.head))

    def result(self) -> GradientConflict:
        """The result over the batches added so far (samples in dataset-index order)."""
        r = self._result
        if self.per_sample:
            used = self.engine.methods or {("sketch" if k == "hooks" and self.engine.sketch else k)
                                           for k in self.kinds.values()}
            r.per_sample_method = "+".join(sorted(used))
            r.engine = self.engine.report()
            r.sketch = self.engine.sketch_report()
        r.samples.sort(key=lambda s: s.index)
        return r


def measure(parts: AVParts, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
            per_sample: bool = True, train_mode: bool = False, *, method: str = "auto",
            gamma: float = MMPARETO_GAMMA, memory_bytes: int | None = None, layer_method: str | None = None,
            sketch: int | None = None, sketch_seed: int = 0, amp: bool = False, tf32: bool = False,
            top_k: int = 10, on_batch: Callable[[int], None] | None = None) -> GradientConflict:
    """MMPareto / PCGrad / head / per-sample gradient conflict of ``parts`` over ``batches``.

    ``batches``: dicts with ``audio`` (B, F, T), ``visual`` (B, 3, T, H, W), ``label`` (B,) and,
    ideally, ``index`` (B,) dataset indices (else positions in the iteration are used).
    ``train_mode``: the per-batch gradients with BatchNorm in train mode (batch statistics, as in a
    training step; the running statistics are restored afterwards); per-sample gradients are always
    taken in eval mode. ``method``: per-sample engine, ``"auto"`` (hooks where they apply, else
    vmap), ``"hooks"``, ``"vmap"`` or ``"loop"``; ``layer_method`` forces one method of
    :mod:`avdiag.measure.conflict.layers` on every layer it applies to (default: timed choice).
    ``memory_bytes``: the memory budget of the eval-mode passes (chunks are sized from it; a
    train-mode batch takes one pass over the whole batch); None: 2 GiB on a CPU, half the free
    memory of a GPU (:func:`~avdiag.measure.conflict.budget.default_budget`). ``sketch``: approximate per-sample
    cosines from a random projection of that many numbers per layer (``sketch_seed``); the result
    then says so and carries the error measured on the first samples. ``amp``: autocast on CUDA.
    ``tf32``: allow TF32 matmuls and convolutions on CUDA (default off: full float32).
    ``on_batch(n)`` is called after each batch. The model is moved to ``device``; its train/eval
    flags, buffers and requires_grad flags are restored afterwards and no ``.grad`` is touched.
    """
    meter = ConflictMeter(parts, device, per_sample, train_mode, method=method, gamma=gamma,
                          memory_bytes=memory_bytes, layer_method=layer_method, sketch=sketch,
                          sketch_seed=sketch_seed, amp=amp, tf32=tf32, top_k=top_k)
    for batch in batches:
        n = meter.add(batch)
        if on_batch is not None:
            on_batch(n)
    return meter.result()

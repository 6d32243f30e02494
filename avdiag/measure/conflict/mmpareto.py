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
independent of their batch) by the engines of :mod:`avdiag.measure.conflict.per_sample`. With
``per_sample=True`` and ``train_mode=False`` the per-batch figures come from the same passes as the
per-sample ones (the batch gradient is the sum of the per-sample gradients).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from avdiag.errors import DataError
from avdiag.measure.conflict.gradients import (
    MODALITIES, Encoder, ModelState, encoder_info, head_pass, shared_masks, tensor_products,
)
from avdiag.measure.conflict.hooks import EngineUnsupported, capture, encoder_products, hooks_apply
from avdiag.measure.conflict.per_sample import ENGINES, sample_products
from avdiag.measure.conflict.results import BatchConflict, BatchModalityConflict, GradientConflict, SampleConflict
from avdiag.models.parts import AVParts

MMPARETO_GAMMA = 1.5
MMPARETO_CLIP = (0.001, 0.999)
DEFAULT_MEMORY_BYTES = 256 * 2**20  # per-sample temporaries per chunk


# ---- the formulas, over |g1|^2, <g1, g2>, |g2|^2 ------------------------------------------------


def cosine(dot: float, n1: float, n2: float) -> float:
    """Cosine from an inner product and two SQUARED norms; NaN when a vector is zero."""
    if not (n1 > 0 and n2 > 0):
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(n1 * n2)))


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
    missing = [m for m in MODALITIES if m not in batch]
    if missing:
        raise DataError(f"conflict needs both modalities; the batch has no {', '.join(missing)}")
    inputs = {m: torch.as_tensor(batch[m]).to(device, non_blocking=True) for m in MODALITIES}
    y = torch.as_tensor(batch["label"]).to(device).long()
    return inputs, y


def _engine(method: str, encs: dict[str, Encoder]) -> str:
    if method not in ("auto", *ENGINES):
        raise ValueError(f"method must be auto, {', '.join(ENGINES)}; got {method!r}")
    hooks_ok = all(hooks_apply(e) for e in encs.values())
    if method == "hooks" and not hooks_ok:
        raise ValueError("the hooks engine needs encoders built from Conv2d / Linear / eval-mode BatchNorm")
    return ("hooks" if hooks_ok else "vmap") if method == "auto" else method


def measure(parts: AVParts, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
            per_sample: bool = True, train_mode: bool = False, *, method: str = "auto",
            gamma: float = MMPARETO_GAMMA, memory_bytes: int = DEFAULT_MEMORY_BYTES,
            top_k: int = 10) -> GradientConflict:
    """MMPareto / PCGrad / head / per-sample gradient conflict of ``parts`` over ``batches``.

    ``batches``: dicts with ``audio`` (B, F, T), ``visual`` (B, 3, T, H, W), ``label`` (B,) and,
    ideally, ``index`` (B,) dataset indices (else positions in the iteration are used).
    ``train_mode``: the per-batch gradients with BatchNorm in train mode (batch statistics, as in a
    training step; the running statistics are restored afterwards); per-sample gradients are always
    taken in eval mode. ``method``: per-sample engine, ``"auto"`` (hooks where they apply, else
    vmap), ``"hooks"``, ``"vmap"`` or ``"loop"``. ``memory_bytes`` bounds the per-sample
    temporaries of a chunk. The model is moved to ``device``; its train/eval flags, buffers and
    requires_grad flags are restored afterwards and no ``.grad`` is touched.
    """
    device = torch.device(device)
    model = parts.model.to(device)
    encs = {m: encoder_info(model, m, parts.encoders[m]) for m in MODALITIES}
    engine = _engine(method, encs)
    enc_ids = {id(p) for e in encs.values() for p in e.params}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids]
    result = GradientConflict(parts.unimodal_source, bool(train_mode), engine if per_sample else None, gamma, 0,
                              {m: list(e.layers) for m, e in encs.items()}, top_k=top_k)
    masks: list[torch.Tensor | None] | None = None
    engines_used: set[str] = set()
    seen = 0
    with ModelState(model, save_buffers=train_mode) as state, torch.enable_grad():
        for position, batch in enumerate(batches):
            inputs, y = _batch_inputs(batch, device)
            n = int(y.shape[0])
            index = batch.get("index")
            index = torch.as_tensor(index).long().tolist() if index is not None else list(range(seen, seen + n))
            seen += n
            shared = per_sample and not train_mode and engine == "hooks"
            try:
                record, samples = _measure_batch(parts, encs, inputs, y, head_params, masks, train_mode, shared,
                                                 gamma, memory_bytes)
            except EngineUnsupported:  # e.g. a module run twice: per-sample products from their own passes
                shared = False
                record, samples = _measure_batch(parts, encs, inputs, y, head_params, masks, train_mode, False,
                                                 gamma, memory_bytes)
            state.reset_buffers()  # undo the running-statistics update of a train-mode forward
            if masks is None:
                masks = record["masks"]
                result.head_shared = int(sum(int(mk.sum()) for mk in masks if mk is not None))
            if per_sample:
                if shared:
                    engines_used.add("hooks")
                else:
                    products, used = sample_products(parts, encs, inputs, y, engine, memory_bytes)
                    samples = {m: sample_cosines(p) for m, p in products.items()}
                    engines_used.add(used)
                result.samples.extend(SampleConflict(i, lab, ca, cv) for i, lab, ca, cv
                                      in zip(index, y.tolist(), samples["audio"], samples["visual"]))
            result.batches.append(BatchConflict(
                position, n, min(index) if index else seen - n, record["losses"]["multimodal"],
                {m: record["losses"][m] for m in MODALITIES}, record["modalities"], record["head_cos"]))
    if per_sample:
        result.per_sample_method = "+".join(sorted(engines_used)) if engines_used else engine
    result.samples.sort(key=lambda s: s.index)
    return result


def _measure_batch(parts: AVParts, encs: dict[str, Encoder], inputs: dict[str, torch.Tensor], y: torch.Tensor,
                   head_params: list[nn.Parameter], masks, train_mode: bool, with_samples: bool, gamma: float,
                   memory_bytes: int) -> tuple[dict[str, Any], dict[str, list[float]] | None]:
    """Per-batch figures; with ``with_samples`` (eval mode, hooks engine) the per-sample cosines
    from the same forward and backward passes."""
    parts.model.train(train_mode)
    with ExitStack() as stack:
        caps = capture(encs, stack) if with_samples else None
        feats = parts.features(inputs)
        if caps is not None:
            stack.close()  # hooks off before the head runs
        masks = shared_masks(parts, head_params, feats) if masks is None else masks
        head = head_pass(parts, feats, y, head_params, masks)
    record: dict[str, Any] = {"losses": head.losses, "modalities": {}, "masks": masks,
                              "head_cos": None if head.head_products is None else cosine(*head.head_products)}
    samples = {} if with_samples else None
    for m, enc in encs.items():
        # with hooks: gradients at the module outputs only; the parameter gradients of the batch
        # are the sums of the per-sample ones (or, where those are never formed, a weight-only
        # convolution backward), so autograd computes no weight gradient twice
        if caps is not None:
            products, grads = encoder_products(enc, caps[m], feats[m], head.cot_mm[m], head.cot_uni[m],
                                               memory_bytes, batch_grads=True)
            samples[m] = sample_cosines(products)
            g1 = [grads.grads[id(p)][0] for p in enc.params]
            g2 = [grads.grads[id(p)][1] for p in enc.params]
        else:
            g1 = torch.autograd.grad(feats[m], enc.params, head.cot_mm[m], retain_graph=True, allow_unused=True)
            g2 = torch.autograd.grad(feats[m], enc.params, head.cot_uni[m], allow_unused=True)
        record["modalities"][m] = encoder_figures(tensor_products(g1, g2, enc.params).cpu().tolist(), enc, gamma)
        del g1, g2
    return record, samples

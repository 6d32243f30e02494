"""Per-sample gradient products ``<g1_i, g2_i>``, ``|g1_i|^2``, ``|g2_i|^2`` of an encoder, in eval
mode, by one of three exact engines:

* ``"hooks"`` (:mod:`avdiag.measure.conflict.hooks`): batched passes and per-module products with a
  method chosen per layer, no per-sample gradient of the whole encoder ever held. Applies to
  encoders whose parameterised modules each run once per forward and own their parameters.
* ``"vmap"``: ``torch.func.functional_call`` + ``vmap`` over ``vjp`` of the whole encoder,
  per-sample gradients materialised for a few samples at a time. Applies where the hooks engine
  does not (a module run twice, a parameter shared by two modules); slower on CPU.
* ``"loop"``: one forward and two backward passes per sample through autograd. The slowest; it
  applies to any encoder autograd can differentiate, including ones ``torch.func`` cannot trace.

This module holds the two whole-encoder engines; :mod:`~avdiag.measure.conflict.engine` runs all
three over the chunks of a batch.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from avdiag.measure.conflict.gradients import Encoder, tensor_products
from avdiag.measure.conflict.products import F64, chunk_size
from avdiag.models.av import audio_features, visual_features

ENGINES = ("hooks", "vmap", "loop")


class EncoderFeatures(nn.Module):
    """Encoder ``m`` plus its pooling (the built-in one of :mod:`avdiag.models.av`, or the adapter's
    ``feature_fn``), as one module for functional_call."""

    def __init__(self, enc: nn.Module, modality: str, feature_fn=None):
        super().__init__()
        self.enc = enc
        self.fn = feature_fn or (audio_features if modality == "audio" else visual_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.enc, x)


def vmap_products(enc: Encoder, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                  memory_bytes: int) -> torch.Tensor:
    """(n, 3) float64 per-sample products with per-sample gradients from vmap(vjp) (eval mode)."""
    wrapper = EncoderFeatures(enc.module, enc.modality, enc.feature_fn)
    params = {"enc." + name: p.detach() for name, p in zip(enc.names, enc.params)}

    def one(p, xi, ui, wi):
        _, pull = torch.func.vjp(lambda q: torch.func.functional_call(wrapper, q, (xi.unsqueeze(0),)), p)
        g1 = pull(ui.unsqueeze(0))[0]
        g2 = pull(wi.unsqueeze(0))[0]
        acc = torch.zeros(3, dtype=F64, device=xi.device)
        for k in p:
            a, b = g1[k], g2[k]
            acc = acc + torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).to(F64)
        return acc

    batched = torch.func.vmap(one, in_dims=(None, 0, 0, 0))
    n_params = sum(p.numel() for p in enc.params)
    c = chunk_size(x.shape[0], 3 * n_params, memory_bytes)
    with warnings.catch_warnings():
        # An op without a batching rule (attention kernels) runs one sample at a time: still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return torch.cat([batched(params, x[s:s + c], c1[s:s + c], c2[s:s + c]) for s in range(0, x.shape[0], c)])


def loop_products(enc: Encoder, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """(n, 3) float64 per-sample products from one forward and two backward passes per sample."""
    wrapper = EncoderFeatures(enc.module, enc.modality, enc.feature_fn)
    rows = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            feature = wrapper(x[i:i + 1])
            g1 = torch.autograd.grad(feature, enc.params, c1[i:i + 1], retain_graph=True, allow_unused=True)
            g2 = torch.autograd.grad(feature, enc.params, c2[i:i + 1], allow_unused=True)
            rows.append(tensor_products(g1, g2, enc.params).sum(0))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=F64)


def encoder_products(engine: str, enc: Encoder, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                     memory_bytes: int) -> torch.Tensor:
    """(n, 3) per-sample products of a whole encoder by ``engine`` ("vmap" or "loop")."""
    if engine == "vmap":
        return vmap_products(enc, x, c1, c2, memory_bytes)
    return loop_products(enc, x, c1, c2)

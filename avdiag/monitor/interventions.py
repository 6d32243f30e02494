"""The two remedies the monitor can apply to the training step (both off by default).

* OGM-GE (Peng, Wei et al., CVPR 2022): each encoder's convolution-weight gradients (4-D tensors, as
  the authors' code selects them) are multiplied by that modality's coefficient ``k_m`` (1 for the
  weaker modality), and generalisation enhancement adds Gaussian noise whose standard deviation is
  that of the unmodulated gradient tensor (plus 1e-8), to both encoders.
* MMPareto (Wei & Hu, ICML 2024): per encoder, the gradients of the multimodal loss ``g1`` and of its
  uni-modal loss ``g2`` are combined with MMPareto's weights (:func:`~avdiag.measure.conflict.mmpareto_weights`:
  min-norm under conflict, else 0.5 / 0.5) as ``gamma * max(1, |g1 + g2| / |g_hat|) * g_hat`` per
  tensor, ``g_hat = 2 a1 g1 + 2 a2 g2`` (:func:`~avdiag.measure.conflict.mmpareto_scale`); the
  encoder's gradient from the loop's backward is replaced by it, and the other parameters (the
  heads) get the uni-modal losses' gradients added (MMPareto trains on ``L_mm + L_a + L_v``). It
  takes one extra forward and two backward passes (:class:`EncoderGradients`, which also gives the
  monitor's periodic cosine); the BatchNorm running statistics are restored after the extra forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avdiag.measure.conflict import MMPARETO_GAMMA, cosine, mmpareto_scale, mmpareto_weights
from avdiag.models.parts import AVParts

GE_EPS = 1e-8


class OGMGEModulation:
    """Applies OGM-GE's coefficients (and, with ``ge``, its noise) to the encoders' conv gradients."""

    def __init__(self, parts: AVParts, ge: bool = True, seed: int = 0):
        self.parts, self.ge, self.seed = parts, ge, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def apply(self, coefficients: dict[str, float]) -> dict:
        touched = 0
        for m, enc in self.parts.encoders.items():
            k = coefficients[m]
            for p in enc.parameters():
                if p.grad is None or p.grad.dim() != 4:
                    continue
                g = p.grad
                modulated = g * k
                if self.ge:
                    noise = torch.empty_like(g).normal_(generator=self._generator(g.device))
                    modulated += noise * (g.std() + GE_EPS)
                p.grad = modulated
                touched += 1
        if not touched:
            return {"method": "ogm-ge", "applied": False,
                    "reason": "no convolution-weight (4-D) gradients in the encoders: OGM-GE modulates those "
                              "only (is step called after backward?)"}
        return {"method": "ogm-ge", "applied": True, "coefficients": dict(coefficients), "ge": self.ge,
                "tensors": touched}


class EncoderGradients:
    """The multimodal and uni-modal loss gradients of every encoder on one batch, from one extra
    forward and two backward passes: ``L_mm = CE(fused)`` and ``L_a + L_v`` (the uni-modal logits of
    a modality depend on its own encoder only, so the summed loss gives each encoder its own ``g_m``;
    the head gets the sum of both). The model's mode is kept (train mode: batch statistics, as in the
    training step); its buffers are restored afterwards, so the running statistics are updated once
    per step, by the loop's own forward. ``.grad`` is not touched."""

    def __init__(self, parts: AVParts):
        self.parts = parts
        self.encoder_params = {m: [p for p in enc.parameters() if p.requires_grad]
                               for m, enc in parts.encoders.items()}
        ids = {id(p) for ps in self.encoder_params.values() for p in ps}
        self.head_params = [p for p in parts.model.parameters() if p.requires_grad and id(p) not in ids]

    def __call__(self, inputs: dict[str, torch.Tensor], label: torch.Tensor):
        """(per modality (params, g_mm, g_m), head gradients of L_a + L_v)."""
        model = self.parts.model
        saved = [b.detach().clone() for b in model.buffers()]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return self._gradients(inputs, label)
        finally:
            with torch.no_grad():
                for b, s in zip(model.buffers(), saved):
                    b.copy_(s)  # undo the second running-statistics update of the extra forward

    def _gradients(self, inputs: dict[str, torch.Tensor], label: torch.Tensor):
        feats = self.parts.features(inputs)
        fused = self.parts.fuse(feats["audio"], feats["visual"])
        uni = self.parts.unimodal(feats["audio"], feats["visual"])
        names = list(self.encoder_params)
        flat = [p for m in names for p in self.encoder_params[m]]
        g_mm = torch.autograd.grad(F.cross_entropy(fused, label), flat, retain_graph=True, allow_unused=True)
        uni_loss = sum(F.cross_entropy(uni[m], label) for m in names)
        g_uni = torch.autograd.grad(uni_loss, flat + self.head_params, allow_unused=True)
        out, offset = {}, 0
        for m in names:
            params = self.encoder_params[m]
            span = slice(offset, offset + len(params))
            out[m] = (params, _filled(params, g_mm[span]), _filled(params, g_uni[span]))
            offset += len(params)
        return out, g_uni[len(flat):]


def _filled(params, grads) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def products(g1: list[torch.Tensor], g2: list[torch.Tensor]) -> list[tuple[float, float, float]]:
    """Per tensor ``(<g1, g2>, |g1|^2, |g2|^2)`` in float64, one device sync."""
    rows = torch.stack([torch.stack(((a.double() * b.double()).sum(), a.double().square().sum(),
                                     b.double().square().sum())) for a, b in zip(g1, g2)])
    return [tuple(r) for r in rows.tolist()]


def conflict_figures(per_tensor: list[tuple[float, float, float]]) -> dict:
    """MMPareto's cosine over the whole encoder, the magnitude ratio |g_m| / |g_mm| and the weights."""
    dot, n1, n2 = (math.fsum(t[i] for t in per_tensor) for i in range(3))
    cos = cosine(dot, n1, n2)
    return {"cos": cos, "magnitude_ratio": math.sqrt(n2 / n1) if n1 > 0 else math.nan, "conflict": bool(cos <= 0),
            "weights": list(mmpareto_weights(n1, dot, n2))}


def measure_cosines(gradients: EncoderGradients, inputs: dict[str, torch.Tensor], label: torch.Tensor) -> dict:
    per_encoder, _ = gradients(inputs, label)
    return {m: conflict_figures(products(g1, g2)) for m, (_, g1, g2) in per_encoder.items()}


class MMParetoCombination:
    """Replaces the encoders' gradients by MMPareto's combination of the multimodal and uni-modal ones."""

    def __init__(self, gradients: EncoderGradients, gamma: float = MMPARETO_GAMMA):
        self.gradients, self.gamma = gradients, gamma

    def apply(self, inputs: dict[str, torch.Tensor], label: torch.Tensor) -> dict:
        per_encoder, head = self.gradients(inputs, label)
        figures = {m: self._combine(params, g1, g2) for m, (params, g1, g2) in per_encoder.items()}
        self._add_to_head(head)
        return {"method": "mmpareto", "applied": True, "gamma": self.gamma, "modalities": figures}

    @torch.no_grad()
    def _combine(self, params, g1, g2) -> dict:
        per_tensor = products(g1, g2)
        figures = conflict_figures(per_tensor)
        a1, a2 = figures["weights"]
        for p, a, b, (td, t1, t2) in zip(params, g1, g2, per_tensor):
            scale = mmpareto_scale(t1, td, t2, a1, a2, self.gamma)
            p.grad = (scale * (2.0 * a1 * a + 2.0 * a2 * b)).to(p.dtype)
        return figures

    @torch.no_grad()
    def _add_to_head(self, grads) -> None:
        for p, g in zip(self.gradients.head_params, grads):
            if g is None:
                continue
            p.grad = g.clone() if p.grad is None else p.grad + g

"""Numerical precision of the forward passes avdiag measures with.

* :func:`full_fp32`: TF32 off for cuBLAS matmuls and cuDNN convolutions inside a block, the user's
  settings restored afterwards. Recent GPUs run float32 convolutions in TF32 by default (10-bit
  mantissa), which moves per-sample figures by ~1e-4..1e-3 and can flip a sign test near zero;
  measurements run in full float32 unless the user opts in (``tf32=True``).
* :func:`amp_dtype` / :func:`autocast`: mixed precision on CUDA, bfloat16 where the GPU supports it
  natively (float32's range: no overflow to inf), else float16.
* :func:`measuring`: both, as one context manager.

On a PyTorch with the per-backend ``fp32_precision`` switches (2.9 and later) only those are read
and written: reading the legacy ``allow_tf32`` flags after the new ones were set raises there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch

DeviceLike = torch.device | str | None


def f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision activations, gradients and logits (``--amp``) are widened to
    float32; float32 and float64 (``--float64``) stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _new_api() -> bool:
    backends = torch.backends
    return hasattr(backends.cuda.matmul, "fp32_precision") and hasattr(getattr(backends.cudnn, "conv", None),
                                                                       "fp32_precision")


def _switches() -> dict[str, tuple[Any, str, Any]]:
    """Every TF32 switch of this PyTorch: name -> (namespace, attribute, value meaning full float32)."""
    b = torch.backends
    if _new_api():
        return {"cuda.matmul.fp32_precision": (b.cuda.matmul, "fp32_precision", "ieee"),
                "cudnn.conv.fp32_precision": (b.cudnn.conv, "fp32_precision", "ieee"),
                "cudnn.rnn.fp32_precision": (b.cudnn.rnn, "fp32_precision", "ieee")}
    return {"cuda.matmul.allow_tf32": (b.cuda.matmul, "allow_tf32", False),
            "cudnn.allow_tf32": (b.cudnn, "allow_tf32", False)}


def tf32_settings() -> dict[str, Any]:
    """The current TF32 switches, e.g. ``{"cuda.matmul.fp32_precision": "tf32", ...}``."""
    return {name: getattr(ns, attr) for name, (ns, attr, _) in _switches().items()}


def _is_cuda(device: DeviceLike) -> bool:
    return device is None or torch.device(device).type == "cuda"


@contextmanager
def full_fp32(device: DeviceLike = None, *, enabled: bool = True) -> Iterator[None]:
    """TF32 off (cuBLAS matmuls, cuDNN convolutions and RNNs) inside the block; every switch is put
    back as it was on exit, exception or not. A no-op when ``enabled`` is False (the user opted in to
    TF32) or ``device`` is not a CUDA device (the switches only act on CUDA; ``None``: apply)."""
    if not enabled or not _is_cuda(device):
        yield
        return
    switches = list(_switches().values())
    saved = [getattr(ns, attr) for ns, attr, _ in switches]
    try:
        for ns, attr, full in switches:
            setattr(ns, attr, full)
        yield
    finally:
        for (ns, attr, _), value in zip(switches, saved):
            setattr(ns, attr, value)


def bf16_supported(device: DeviceLike = None) -> bool:
    """Whether the CUDA ``device`` (default: the current one) runs bfloat16 natively, not emulated."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(torch.device(device or "cuda")):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a PyTorch without the emulation switch
            return bool(torch.cuda.is_bf16_supported())


def amp_dtype(device: DeviceLike) -> torch.dtype:
    """The autocast dtype for ``device``: bfloat16 on a GPU that supports it, else float16 (CPU
    autocast is never used by avdiag, but bfloat16 is its only sensible choice)."""
    if torch.device(device or "cuda").type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def amp_active(device: DeviceLike, amp: bool) -> bool:
    """Whether ``amp`` takes effect: mixed precision runs on CUDA only."""
    return bool(amp) and device is not None and torch.device(device).type == "cuda"


def autocast(device: DeviceLike, amp: bool):
    """``torch.autocast`` in :func:`amp_dtype` on a CUDA ``device`` when ``amp``, else a no-op."""
    if not amp_active(device, amp):
        return nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


def amp_dtype_name(device: DeviceLike, amp: bool) -> str | None:
    """``"bfloat16"`` / ``"float16"`` when ``amp`` takes effect on ``device``, else None."""
    return str(amp_dtype(device)).removeprefix("torch.") if amp_active(device, amp) else None


@contextmanager
def measuring(device: DeviceLike, *, amp: bool = False, tf32: bool = False) -> Iterator[None]:
    """The precision of a measurement on ``device``: full float32 unless ``tf32``, autocast when
    ``amp`` on CUDA."""
    with ExitStack() as stack:
        stack.enter_context(full_fp32(device, enabled=not tf32))
        stack.enter_context(autocast(device, amp))
        yield

"""avdiag's small built-in audio-visual transformer, so the whole pipeline (inspect --data with dormant
units, conflict, contribution, the report) can be shown without a download.

Each modality has its own encoder: a patch embedding (a strided convolution over the spectrogram
``(B, F, T)``, or over every frame of the clip ``(B, 3, T, H, W)`` with the frames' tokens joined
per sample), fixed sinusoidal positions, ``depth`` pre-norm blocks (multi-head attention, then an
MLP ``fc1 -> GELU -> fc2``), a final LayerNorm and the mean over tokens. The two pooled features are
concatenated into the linear ``head`` (audio first). It follows the adapter protocol of
:mod:`avdiag.models.parts` (``audio_encoder``, ``visual_encoder``, ``fuse``), so conflict and
contribution run on it as on any adapter model. Key layout: ``audio_encoder.patch_embed``,
``audio_encoder.blocks.N.{norm1,attn,norm2,mlp.fc1,mlp.fc2}``, ``audio_encoder.norm``, the same under
``visual_encoder``, and ``head``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from avdiag.models.registry import Architecture, ArchSpec, LayoutEvidence, out_features, register

if TYPE_CHECKING:
    from avdiag.load.store import TensorStore

AUDIO_PATCH = 8  # spectrogram patches of 8 x 8 bins
VISUAL_PATCH = 8  # frame patches of 8 x 8 pixels
HEADS = 4
MLP_RATIO = 2


def sinusoidal_positions(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, dim) fixed positional encodings (sin on even, cos on odd features), computed in float32 or
    wider (a float64 model gets a float64 table)."""
    wide = torch.promote_types(dtype, torch.float32)
    pos = torch.arange(n, device=device, dtype=wide)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=wide) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device, dtype=wide)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int = HEADS, activation: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TokenEncoder(nn.Module):
    """Patch embedding -> positions -> blocks -> LayerNorm -> mean over tokens."""

    def __init__(self, in_channels: int, patch: int, dim: int, depth: int, activation: str = "gelu"):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(Block(dim, activation=activation) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2], tokens.device, tokens.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, tokens, dim)."""
        return self.patch_embed(images).flatten(2).transpose(1, 2)


class AudioTokenEncoder(TokenEncoder):
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, F, T) or (B, 1, F, T) spectrogram -> (B, dim)."""
        if audio.dim() == 3:
            audio = audio.unsqueeze(1)
        return self.encode(self.patches(audio))


class VisualTokenEncoder(TokenEncoder):
    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) clip -> every frame's patches, joined per sample -> (B, dim)."""
        if visual.dim() != 5:
            raise ValueError(f"expected a 5-D (B, C, T, H, W) clip, got shape {tuple(visual.shape)}")
        b, c, t, h, w = visual.shape
        frames = visual.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # sample-major rows
        tokens = self.patches(frames)
        return self.encode(tokens.reshape(b, t * tokens.shape[1], tokens.shape[2]))


class AVTransformer(nn.Module):
    """Two token encoders and a linear head over their concatenated pooled features (audio first)."""

    def __init__(self, n_classes: int, dim: int = 32, depth: int = 2, activation: str = "gelu"):
        super().__init__()
        if dim % (2 * HEADS):
            raise ValueError(f"dim must be a multiple of {2 * HEADS}, got {dim}")
        self.audio_encoder = AudioTokenEncoder(1, AUDIO_PATCH, dim, depth, activation)
        self.visual_encoder = VisualTokenEncoder(3, VISUAL_PATCH, dim, depth, activation)
        self.head = nn.Linear(2 * dim, n_classes)

    def fuse(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat((a, v), dim=1))

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.audio_encoder(audio), self.visual_encoder(visual))


_BLOCK = re.compile(r"^audio_encoder\.blocks\.(\d+)\.")


@register
class AVTransformerFamily(Architecture):
    name = "av-transformer"
    encoders = {"audio_encoder": "audio", "visual_encoder": "visual"}
    fusion = "concat"

    def claims(self, evidence: LayoutEvidence) -> bool:
        return evidence.has("audio_encoder.patch_embed.") and evidence.has("visual_encoder.patch_embed.")

    def spec(self, store: TensorStore, fusion: str | None) -> ArchSpec | None:
        key = "audio_encoder.patch_embed.weight"
        n_classes = out_features(store, "head")
        if key not in store or n_classes is None:
            return None
        shape = store.info(key).shape
        if len(shape) != 4 or tuple(shape[1:]) != (1, AUDIO_PATCH, AUDIO_PATCH):
            return None
        depth = len({int(m.group(1)) for n in store.names() if (m := _BLOCK.match(n))})
        return ArchSpec(self.name, n_classes, shape[0], depth, fusion="concat")

    def build(self, spec: ArchSpec) -> nn.Module:
        return AVTransformer(spec.n_classes, dim=spec.width, depth=spec.depth)

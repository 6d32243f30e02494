"""A small audio-visual transformer that follows avdiag's adapter protocol (``audio_encoder``,
``visual_encoder``, ``fuse``, optionally ``unimodal``), for the adapter tests. Its visual encoder folds
frames time-major, a row order the module-products engine could not see."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchEncoder(nn.Module):
    """Patches -> tokens (+ a learned position table owned by this module) -> one block -> mean."""

    def __init__(self, channels: int, dim: int, tokens: int):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.block = Block(dim)

    def tokens(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.block(t + self.pos[:, :t.shape[1]])


class AudioEncoder(PatchEncoder):
    def forward(self, audio):
        return self.tokens(audio.unsqueeze(1)).mean(1)


class VisualEncoder(PatchEncoder):
    def forward(self, visual):
        b, c, t, h, w = visual.shape
        frames = visual.permute(2, 0, 1, 3, 4).reshape(t * b, c, h, w)  # time-major rows
        return self.tokens(frames).mean(1).view(t, b, -1).mean(0)


class TinyAVTransformer(nn.Module):
    def __init__(self, classes: int, dim: int = 8, unimodal_heads: bool = False):
        super().__init__()
        self.audio_encoder = AudioEncoder(1, dim, 16)
        self.visual_encoder = VisualEncoder(3, dim, 16)
        self.head = nn.Linear(2 * dim, classes)
        if unimodal_heads:
            self.head_a, self.head_v = nn.Linear(dim, classes), nn.Linear(dim, classes)
            self.unimodal = lambda a, v: {"audio": self.head_a(a), "visual": self.head_v(v)}

    def fuse(self, a, v):
        return self.head(torch.cat([a, v], 1))

    def forward(self, audio, visual):
        return self.fuse(self.audio_encoder(audio), self.visual_encoder(visual))


def make() -> TinyAVTransformer:
    """The factory ``--model helpers.tiny_transformer:make`` (4 classes, width 8)."""
    return TinyAVTransformer(4)

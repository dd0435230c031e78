"""Rotary position embeddings of STARFlow: 2-D/3-D grid positions with an optional text prefix."""
import math

import torch
from torch import nn


def grid_positions(h, w, pt_seq_len=None, frames=0, txt_len=0, third_axis=True):
    """Positions (N, 2 or 3) of [text; frames x h x w] tokens, rows normalised so the mean side spans pt_seq_len.

    Text token j sits at (0, 0, j * P / txt_len); image tokens at (row, col, frame) in raster order, frame-major.
    """
    side = math.sqrt(h * w)
    span = pt_seq_len if pt_seq_len is not None else side
    rows = torch.arange(h, dtype=torch.float64) * span / side
    cols = torch.arange(w, dtype=torch.float64) * span / side
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    if not third_axis:
        return grid.float()
    t = torch.arange(max(frames, 1), dtype=torch.float64).repeat_interleave(h * w)
    image = torch.cat([grid.repeat(max(frames, 1), 1), t[:, None]], dim=1)
    if txt_len:
        text = torch.zeros(txt_len, 3, dtype=torch.float64)
        text[:, 2] = torch.arange(txt_len, dtype=torch.float64) * span / txt_len
        image = torch.cat([text, image], dim=0)
    return image.float()


class RotaryEmbedding(nn.Module):
    """Maps positions (N, 2 or 3) to rotations (N, head_dim/2): unit complex numbers e^(i angle), complex64.

    Three-axis positions split the head_dim/2 angles into [head_dim/2 - 8 spatial | 8 third-axis]; two-axis
    positions use all head_dim/2 angles for the two spatial axes.
    """

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def spatial_frequencies(self, n):
        """theta^(-2k/n) for k < n/2, float64."""
        return self.theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)

    def forward(self, pos):
        """No buffers: the tables are recomputed per call, so the module also works when built on the meta device."""
        pos = pos.to(torch.float64)
        half = self.head_dim // 2
        if pos.shape[1] == 3:
            xy = self.spatial_frequencies(half - 8)
            t = self.theta ** (-torch.arange(8, dtype=torch.float64) / 8)
            angles = torch.cat([pos[:, :1] * xy, pos[:, 1:2] * xy, pos[:, 2:] * t], 1)
        else:
            xy = self.spatial_frequencies(half)
            angles = torch.cat([pos[:, :1] * xy, pos[:, 1:2] * xy], 1)
        return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(t, rotation, halves=False):
    """Rotates channel pairs of t (..., L, d) by the unit complex numbers rotation (L, d/2): adjacent pairs
    (2i, 2i + 1), or with `halves` the pairs (i, i + d/2) of the Hugging Face convention. Computed in float32.

    One complex product: a real rotation stacks strided halves of t, several times slower on CPU."""
    x = t.float()
    if halves:
        out = torch.complex(*x.chunk(2, dim=-1)) * rotation
        return torch.view_as_real(out).transpose(-1, -2).flatten(-2).to(t.dtype)  # [real | imag], no selects
    pairs = x.unflatten(-1, (-1, 2))
    # view_as_complex needs (re, im) adjacent and aligned; compiled, always copied (the compiler fuses the copy,
    # and testing strides would break the graph)
    if torch.compiler.is_compiling() or pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or \
            any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).to(t.dtype)

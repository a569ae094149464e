"""A 1D convolutional denoiser for sequences, with a sinusoidal time embedding: the Gaussian backbone's noise
predictor eps_theta(x_t, t), or (five input channels, the fifth the mask token) the masked backbone's x0 logits.
With ``conditional=True`` it also reads a label y (the DDOM and CFG baselines' eps_theta(x_t, t, y))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of steps t (B,) (integer, or real for the masked backbone's time) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, channels), channels)
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding="same")
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2 = nn.GroupNorm(min(8, channels), channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding="same")

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.conv1(F.silu(self.norm1(h))) + self.emb(emb)[:, :, None]
        return h + self.conv2(F.silu(self.norm2(z)))


class ConvDenoiser(nn.Module):
    """x_t (B, L, in_channels), t (B,) steps -> (B, L, 4): predicted noise (Gaussian backbone, 4 input channels)
    or x0 logits over the alphabet (masked backbone, 5 input channels: the letters and the mask token).

    Residual conv blocks over the sequence, each told the step through a learned projection of a
    sinusoidal embedding; a linear read-out per position over all positions mixes in global context.

    ``conditional``: a label embedding for classifier-free guidance (off by default, so unconditional checkpoints and
    their initial weights are unchanged). A scalar label y (B,) (standardised) is embedded by a small MLP and added
    to the step's embedding; a NaN label, or ``y=None``, takes the learned "no label" embedding instead.
    """

    def __init__(self, length: int, channels: int = 64, blocks: int = 3, kernel_size: int = 5, emb_dim: int = 64,
                 in_channels: int = 4, conditional: bool = False):
        super().__init__()
        self.length, self.in_channels = length, in_channels
        self.inp = nn.Conv1d(in_channels, channels, kernel_size, padding="same")
        self.emb = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.blocks = nn.ModuleList([ResBlock(channels, kernel_size, emb_dim) for _ in range(blocks)])
        self.out = nn.Sequential(nn.GroupNorm(min(8, channels), channels), nn.SiLU(), nn.Conv1d(channels, 4, 1))
        self.emb_dim, self.conditional = emb_dim, conditional
        if conditional:  # created last, so that the unconditional layers draw the same initial weights
            self.label = nn.Sequential(nn.Linear(1, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.null_label = nn.Parameter(torch.zeros(emb_dim))

    def label_embedding(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """(n, emb_dim): the embedding of labels y (n,), the "no label" one where y is NaN or None."""
        if y is None:
            return self.null_label.expand(n, -1)
        y = y.to(self.null_label.dtype)
        return torch.where(y.isnan()[:, None], self.null_label, self.label(torch.nan_to_num(y)[:, None]))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.emb(time_embedding(t, self.emb_dim).to(x.dtype))
        if self.conditional:
            emb = emb + self.label_embedding(y, x.shape[0])
        elif y is not None:
            raise ValueError("y: this denoiser has no label embedding (build it with conditional=True)")
        h = self.inp(x.transpose(1, 2))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).transpose(1, 2)

"""A 1D CNN over (soft) one-hot sequences, used by trained oracles and reward models."""

from __future__ import annotations

import torch
from torch import nn


class SequenceCNN(nn.Module):
    """(N, L, 4) one-hot (hard or relaxed) -> (N,) score.

    ``layers`` same-padded conv blocks, each followed by max-pooling by ``pool`` while the sequence is
    longer than the kernel (so long sequences stay cheap and short ones keep every position), then two
    dense layers; ``features`` returns the last hidden layer phi(x) (N, hidden), which BRAID's bonus uses.
    """

    def __init__(self, length: int, channels: int = 64, layers: int = 3, kernel_size: int = 7,
                 hidden: int = 128, pool: int = 1, dropout: float = 0.0):
        super().__init__()
        convs: list[nn.Module] = []
        in_ch, out_len = 4, length
        for _ in range(layers):
            convs += [nn.Conv1d(in_ch, channels, kernel_size, padding="same"), nn.ReLU()]
            if pool > 1 and out_len // pool >= kernel_size:
                convs.append(nn.MaxPool1d(pool))
                out_len //= pool
            in_ch = channels
        self.convs = nn.Sequential(*convs)
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * out_len, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)
        self.length = length

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (N, L, 4) -> (N, hidden)."""
        if x.shape[1:] != (self.length, 4):
            raise ValueError(f"expected one-hot input of shape (N, {self.length}, 4), got {tuple(x.shape)}")
        return self.dense(self.convs(x.transpose(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)

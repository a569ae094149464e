"""Optimus 5-Prime (Sample et al. 2019; multi-output weights of Castillo-Hair et al. 2024) in torch.

Loads the bundled pickle-free npz (Keras layer names). The Keras model: three Conv1D(120, 8, 'same', relu),
Flatten in (position, channel) order, Dense(40, relu), Dense(3) -> MRL for [HEK293T, T cells, HepG2].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OUTPUTS = ("HEK293T", "T cells", "HepG2")


class Optimus5Prime(nn.Module):
    """(N, 50, 4) one-hot over ACGT -> (N, 3) mean ribosome load."""

    length = 50

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(4, 120, 8), nn.Conv1d(120, 120, 8), nn.Conv1d(120, 120, 8)])
        self.dense_1 = nn.Linear(50 * 120, 40)
        self.dense_2 = nn.Linear(40, 3)

    @classmethod
    def from_npz(cls, path: str | Path) -> Optimus5Prime:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Optimus 5-Prime weights not found: {path}")
        w = np.load(path, allow_pickle=False)
        model = cls()
        with torch.no_grad():
            for i, conv in enumerate(model.convs, start=1):
                conv.weight.copy_(torch.from_numpy(w[f"conv_{i}.kernel"]).permute(2, 1, 0))  # (k,in,out)->(out,in,k)
                conv.bias.copy_(torch.from_numpy(w[f"conv_{i}.bias"]))
            for name in ("dense_1", "dense_2"):
                layer = getattr(model, name)
                layer.weight.copy_(torch.from_numpy(w[f"{name}.kernel"]).T)
                layer.bias.copy_(torch.from_numpy(w[f"{name}.bias"]))
        return model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # (N, 4, L)
        for conv in self.convs:
            h = F.relu(conv(F.pad(h, (3, 4))))  # TF 'same' padding for kernel 8: 3 before, 4 after
        h = h.transpose(1, 2).flatten(1)  # Keras Flatten: (position, channel) order
        return self.dense_2(F.relu(self.dense_1(h)))

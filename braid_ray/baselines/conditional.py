"""DDOM and CFG: a conditional denoiser eps_theta(x_t, t, y), trained with label dropout and sampled with
classifier-free guidance (Ho & Salimans 2022) at a high target y. One code path for both baselines; they differ
only in the rows they learn from (``training_rows``):

- **DDOM** (Krishnamoorthy et al. 2023, as the BRAID paper runs it): trained from scratch on D_off's sequences and
  labels only, optionally drawing rows with DDOM's binned weights that favour high y (``ddom_weights``).
- **CFG** (DRAKES's classifier-free-guidance row): a conditional pretraining, from scratch, on every sequence of D
  (what the pretrained model sees), labelled where the row is in D_off and unlabelled (the "no label" embedding)
  elsewhere. No label outside D_off is ever read: like BRAID, both are offline methods.

Labels are standardised by D_off's mean and std of y; a NaN label means "no label". The backbone (Gaussian or
masked) is the pretrained model's; its loss and sampler are used unchanged, through the two wrappers below that
bind the label to the denoiser's call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from braid_ray.config import DiffusionConfig
from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.pretrain import Backbone, pretrain

REWEIGHT_BINS = 20  # DDOM's reweighting: bins of y over D_off
REWEIGHT_K = 0.01  # ... a bin's mass is scaled by N_b / (N_b + K N): rare bins (a few extreme rows) are damped
REWEIGHT_TAU_QUANTILE = 0.9  # ... and by exp(-|y_max - y_b| / tau), tau = y_max - this quantile of y


class WithLabels(nn.Module):
    """``model(x, t)`` -> ``model(x, t, y)`` for a fixed batch of labels y (B,) (NaN = no label): what the backbone's
    loss calls while a conditional model trains."""

    def __init__(self, model: ConvDenoiser, y: torch.Tensor):
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, self.y)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance at a target label y (standardised): out = (1 + w) model(x, t, y) - w model(x, t),
    the noise prediction (Gaussian backbone) or the x0 logits (masked backbone: in log space, softmax((1 + w)
    log p(. | y) - w log p(.)), up to a per-position constant). w = 0 is the conditional model alone."""

    def __init__(self, model: ConvDenoiser, y: float, w: float):
        super().__init__()
        self.model, self.y, self.w = model, float(y), float(w)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.w == 0:
            return self.model(x, t, torch.full((n,), self.y, device=x.device))
        y = torch.cat([torch.full((n,), self.y, device=x.device), torch.full((n,), math.nan, device=x.device)])
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), y)  # one pass (GroupNorm is per row)
        return (1 + self.w) * both[:n] - self.w * both[n:]


def conditional_denoiser(cfg: DiffusionConfig, length: int, in_channels: int, seed: int) -> ConvDenoiser:
    """The pretrained model's denoiser architecture with a label embedding; initial weights from ``seed`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvDenoiser(length, cfg.channels, cfg.blocks, cfg.kernel_size, cfg.emb_dim, in_channels,
                            conditional=True)


def training_rows(data: str, codes: np.ndarray, y: np.ndarray, off: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(codes (N, L), standardised labels (N,) with NaN = no label, D_off's mean and std of y) for a conditional
    baseline that learns from ``data``: ``d_off`` (DDOM: D_off's rows) or ``d`` (CFG: every row of D, labelled only
    where it is in D_off). ``off`` indexes D_off's rows in ``codes`` / ``y``."""
    y_off = y[off]
    mean, std = float(y_off.mean()), float(y_off.std()) or 1.0
    if data == "d_off":
        return codes[off], (y_off - mean) / std, mean, std
    if data == "d":
        labels = np.full(len(codes), np.nan)
        labels[off] = (y_off - mean) / std
        return codes, labels, mean, std
    raise ValueError(f"data: got {data!r}, expected 'd_off' or 'd'")


def ddom_weights(y: np.ndarray) -> np.ndarray:
    """DDOM's reweighting (after MINs, Kumar & Levine 2020): each row's probability (N,) of being drawn, so that bin
    b of y holds mass proportional to N_b / (N_b + K N) * exp(-|y_max - y_b| / tau), y_b its centre; high-y bins
    are drawn more, and bins of a few extreme rows are damped by the first factor."""
    edges = np.linspace(y.min(), y.max(), REWEIGHT_BINS + 1)
    which = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, REWEIGHT_BINS - 1)
    counts = np.bincount(which, minlength=REWEIGHT_BINS).astype(float)
    share = counts / counts.sum()
    tau = max(float(y.max() - np.quantile(y, REWEIGHT_TAU_QUANTILE)), 1e-12)
    centres = (edges[:-1] + edges[1:]) / 2
    mass = share / (share + REWEIGHT_K) * np.exp(-np.abs(y.max() - centres) / tau)
    per_row = mass[which] / counts[which]
    return per_row / per_row.sum()


def train_conditional(model: ConvDenoiser, backbone: Backbone, codes: np.ndarray, labels: np.ndarray,
                      cfg: DiffusionConfig, epochs: int, label_dropout: float, seed: int,
                      weights: np.ndarray | None = None, device: torch.device | None = None,
                      on_epoch: Callable[[int, float], None] | None = None,
                      save: Callable[[dict], None] | None = None, resume: dict | None = None) -> list[float]:
    """Train ``model`` (on ``device``) as pretraining does (``diffusion.pretrain.pretrain``: the backbone's own loss,
    Adam with cosine decay, cfg.batch_size rows per step) on codes (N, L) with their labels (N,) (NaN = no label)
    for ``epochs`` passes; each step drops a row's label with probability ``label_dropout`` (the unconditional
    model that guidance needs). ``weights`` (N,): draw each pass's rows with these probabilities (with
    replacement) instead of a permutation. ``save`` / ``resume``: checkpoints after every pass, as in ``pretrain``.
    Returns the mean loss per pass."""
    device = device or torch.device("cpu")
    y_all = torch.as_tensor(labels, dtype=torch.float32, device=device)

    def with_labels(rows: torch.Tensor, g: torch.Generator) -> nn.Module:
        y = y_all[rows].clone()
        y[torch.rand(len(rows), generator=g, device=device) < label_dropout] = math.nan
        return WithLabels(model, y)

    return pretrain(model, backbone, codes, cfg, seed, device=device, on_epoch=on_epoch, epochs=epochs,
                    weights=weights, batch_model=with_labels, save=save, resume=resume)

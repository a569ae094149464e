"""Pretraining the diffusion model on the task's sequences (no labels): the backbone's loss (DDPM's, or the masked
NELBO), Adam, cosine decay.

Runs in one process or as one rank of a data-parallel group (the caller wraps ``model`` in DDP and gives
each rank its own shard of rows); the loop is the same. After every pass it can hand its whole training state
to the caller, and it continues from such a state as if never interrupted (``training_state_bytes``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from braid_ray.config import DiffusionConfig
from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.masked import MaskedDiffusion

Backbone = GaussianOneHotDiffusion | MaskedDiffusion
# name -> backbone class (``from_config`` builds it; ``in_channels`` sizes its denoiser's input)
BACKBONES: dict[str, type[GaussianOneHotDiffusion] | type[MaskedDiffusion]] = {
    "gaussian_onehot": GaussianOneHotDiffusion, "masked": MaskedDiffusion}


def build_backbone(cfg: DiffusionConfig, length: int, temperature: float = 0.5,
                   straight_through: bool = False) -> Backbone:
    return _backbone_class(cfg).from_config(cfg, length, temperature, straight_through)


def _backbone_class(cfg: DiffusionConfig) -> type[GaussianOneHotDiffusion] | type[MaskedDiffusion]:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown diffusion backbone {cfg.backbone!r}; valid: {sorted(BACKBONES)}")
    return BACKBONES[cfg.backbone]


def build_denoiser(cfg: DiffusionConfig, length: int, seed: int | None = None) -> ConvDenoiser:
    """The denoiser on the CPU, with the input channels its backbone needs; with ``seed``, its initial weights
    depend on the seed alone (the same on every rank), drawn without touching the global RNG's state."""
    in_channels = _backbone_class(cfg).in_channels
    if seed is None:
        return ConvDenoiser(length, cfg.channels, cfg.blocks, cfg.kernel_size, cfg.emb_dim, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvDenoiser(length, cfg.channels, cfg.blocks, cfg.kernel_size, cfg.emb_dim, in_channels)


def pretrain(model: nn.Module, backbone: Backbone, codes: np.ndarray, cfg: DiffusionConfig,
             seed: int, batch_size: int | None = None, device: torch.device | None = None,
             on_epoch: Callable[[int, float], None] | None = None, *, epochs: int | None = None,
             weights: np.ndarray | None = None,
             batch_model: Callable[[torch.Tensor, torch.Generator], nn.Module] | None = None,
             save: Callable[[dict[str, Any]], None] | None = None, resume: dict[str, Any] | None = None) -> list[float]:
    """Train ``model`` (the backbone's denoiser, already on ``device``) on one-hot ``codes`` (N, L) for cfg.epochs
    (or ``epochs``) passes with the backbone's own loss; returns the mean loss per pass. Adam at cfg.lr with cosine
    decay. The rows, the noise and its generator live on ``device`` (default: the CPU).

    ``batch_size`` is this rank's share of cfg.batch_size (default: all of it). ``weights`` (N,): draw each pass's
    rows with these probabilities (with replacement) instead of a permutation. ``batch_model(rows, generator)``: the
    module the loss calls for a batch of row indices (a label-conditioned model with the batch's labels,
    ``baselines/conditional.py``), drawing any noise it needs from the training generator; default ``model``.

    ``save(state)`` is called after every pass with the whole training state: the weights, Adam's moments, the
    schedule, both random streams and the losses so far. ``resume``: such a state; the remaining passes then run
    exactly as they would have without the interruption.
    """
    batch_size = batch_size or cfg.batch_size
    epochs = cfg.epochs if epochs is None else epochs
    device = device or torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_all = backbone.encode(torch.from_numpy(np.asarray(codes)).to(device))
    steps_per_epoch = max(1, math.ceil(len(codes) / batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    losses: list[float] = []
    module = getattr(model, "module", model)  # under DDP, the wrapped model's weights (the same on every rank)
    if resume is not None:
        module.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["schedule"])
        g.set_state(resume["generator"])
        rng.bit_generator.state = resume["rng"]
        losses = list(resume["losses"])
    model.train()
    for epoch in range(len(losses), epochs):
        order = rng.permutation(len(codes)) if weights is None else rng.choice(len(codes), len(codes), p=weights)
        order = torch.from_numpy(order).to(device)
        total = 0.0
        for s in range(steps_per_epoch):
            rows = order[s * batch_size:(s + 1) * batch_size]
            x0, net = x_all[rows], (model if batch_model is None else batch_model(rows, g))
            if cfg.data_noise > 0:
                x0 = x0 + cfg.data_noise * torch.randn(x0.shape, generator=g, device=device)
            loss = backbone.loss(net, x0, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])
        if save is not None:
            save({"model": module.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                  "generator": g.get_state(), "rng": rng.bit_generator.state, "losses": losses})
    return losses


def training_state_bytes(state: dict[str, Any]) -> bytes:
    """``pretrain``'s training state as a file (tensors and plain Python values; read without pickle)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


STATE_KEYS = ("model", "optimizer", "schedule", "generator", "rng", "losses")
NOISE_KEYS = ("generator", "rng")  # a rank's own part of the state under data parallelism


def load_training_state(data: bytes, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, Any]:
    """The training state (or the ``keys`` of it) ``training_state_bytes`` wrote, on the CPU (``pretrain`` moves
    it where it trains)."""
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    missing = set(keys) - set(state)
    if missing:
        raise ValueError(f"not a pretraining state: no {sorted(missing)}")
    return state

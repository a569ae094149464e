"""Offline Guidance: classifier guidance on the pretrained model by the reward ensemble trained on D_off, with no
fine-tuning; and the sampler every steering baseline draws its designs with.

At each reverse step t the pretrained model predicts x0 (``backbone.prediction``); the guiding reward
r_z(x0) = (r_hat - g_hat)(x0) / std_y (z-units of y over D_off, so a scale means the same on every task; g_hat = 0
for the paper's Offline Guidance, or a conservative penalty, ``baselines.guidance_penalty``) is differentiated
w.r.t. x0 **at the predicted x0**, not through the denoiser (the Jacobian d x0_hat / d x_t is taken as the
identity: one reward backward pass per step, no denoiser backward pass). The step is then tilted by
``backbone.guide``:

- Gaussian backbone: the mean moves by scale * sigma_t^2 * grad (Dhariwal & Nichol's classifier guidance), so with
  a reward linear in x0, r = w . x0, every step's mean moves by exactly scale * sigma_t^2 * w.
- Masked backbone: the step's x0 logits are tilted by the first-order (Taylor) estimate of the reward's change
  over the letter at each position (Nisonoff et al. 2024's Taylor-approximated guidance, TAG; DRAKES's guidance
  rows): p(j) -> p(j) exp(scale * dr/dp_lj) / Z, exact for a reward linear in the one-hot.

The reward reads what it reads in fine-tuning (``backbone.reward_input``): the relaxed one-hot of x0. No oracle is
read here: the scale is chosen by the evaluation's selection budget (braid_ray/baselines/rows.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from braid_ray.diffusion.pretrain import Backbone
from braid_ray.reward.conservative import ConservativeReward

RewardFn = Callable[[torch.Tensor], torch.Tensor]  # x0 (B, L, 4) in diffusion space -> reward (B,)


def guiding_reward(reward: ConservativeReward, backbone: Backbone) -> RewardFn:
    """r_z(x0) = (r_hat - g_hat)(reward_input(x0)) / std_y under ``reward``'s penalty, differentiable in x0."""
    def r_z(x0: torch.Tensor) -> torch.Tensor:
        r_hat, g_hat = reward(backbone.reward_input(x0))
        return (r_hat - g_hat) / reward.stats.y_std

    return r_z


def reward_gradient(reward_fn: RewardFn, x0: torch.Tensor) -> torch.Tensor:
    """d reward_fn / d x0 (B, L, 4) at x0 (detached from any graph)."""
    with torch.enable_grad():
        x0 = x0.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(reward_fn(x0).sum(), x0)
    return grad


@torch.no_grad()
def sample(backbone: Backbone, model: nn.Module, n: int, generator: torch.Generator | None = None,
           reward_fn: RewardFn | None = None, scale: float = 0.0, device: torch.device | None = None) -> torch.Tensor:
    """x0 (n, L, 4) from ``model``'s reverse process, each step tilted by ``scale`` times the guidance of
    ``reward_fn`` (none without it, or at scale 0). The prior and every step's noise are drawn as
    ``sampler.rollout`` draws them, so at scale 0 the pretrained model gives the Pretrained row's designs."""
    x = backbone.prior(n, generator, device)
    for t in range(backbone.steps, 0, -1):
        params, x0_hat = backbone.prediction(model, x, t)
        if reward_fn is not None and scale != 0:
            params = backbone.guide(params, reward_gradient(reward_fn, x0_hat), scale)
        x = backbone.step(params, x, t, backbone.noise(x, t, generator))
    return x


def designs(backbone: Backbone, model: nn.Module, n: int, batch: int, seed: int, reward_fn: RewardFn | None = None,
            scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n hard designs (codes (n, L)) and the mean distance of each x0 from the one-hot vertices (n,), sampled in
    batches of ``batch`` from one generator seeded by ``seed`` (as ``evaluate.sample_codes`` does)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.cat([sample(backbone, model, min(batch, n - i), g, reward_fn, scale) for i in range(0, n, batch)])
    return backbone.decode(x0).numpy().astype(np.int8), (x0.abs() - 1).abs().mean((1, 2)).numpy()

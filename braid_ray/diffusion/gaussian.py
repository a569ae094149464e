"""Gaussian diffusion over one-hot sequences scaled to +-1: DDPM training, DDIM/ancestral policies.

The backbone interface the fine-tuning loop needs (a simplex or masked discrete diffusion can provide the
same methods):
- ``prior(n)``: x_T;  ``steps``;  ``policy(model, x_t, t)`` -> (mean, sigma) of p_t(x_{t-1} | x_t);
- ``loss(model, x0)``: the pretraining loss;  ``encode(codes)`` / ``decode(x0)``;
- ``reward_input(x0)``: the relaxed one-hot the reward scores during fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braid_ray.diffusion.schedule import Schedule


class GaussianOneHotDiffusion:
    """``clip_x0``: clip the predicted x0 to [-1, 1] at every reverse step (the data are +-1 one-hot) and take
    the noise that this x0 implies, as diffusers' DDIM ``clip_sample`` does. Without it the cosine schedule's
    last beta (0.999, so sqrt(alpha_bar_T) ~ 0.03) multiplies the first step's noise-prediction error by ~30:
    the first step's mean lands far off the data (measured 0.7 per coordinate against 0.03 on TFBind8) and
    carries most of the path's KL. With it, the Jacobian of a clipped coordinate is zero, so the reward's
    gradient hardly reaches the policy through the sampler (TFBind8, alpha 0.01, 100 steps: whole-path KL
    0.02 nats, no reward gain): off by default, until a gradient-preserving fix is chosen."""

    def __init__(self, length: int, steps: int = 50, eta: float = 1.0, temperature: float = 0.5,
                 straight_through: bool = False, clip_x0: bool = False):
        self.length, self.schedule = length, Schedule(steps, eta)
        self.temperature, self.straight_through, self.clip_x0 = temperature, straight_through, clip_x0

    @property
    def steps(self) -> int:
        return self.schedule.steps

    # ---- data <-> diffusion space
    @staticmethod
    def encode(codes: torch.Tensor) -> torch.Tensor:
        """int codes (N, L) -> x0 in {-1, +1}^(N, L, 4) (one-hot scaled to +-1)."""
        return F.one_hot(codes.long(), 4).float() * 2 - 1

    @staticmethod
    def decode(x0: torch.Tensor) -> torch.Tensor:
        """x0 (N, L, 4) -> int codes (N, L): the letter with the largest coordinate."""
        return x0.argmax(-1)

    def reward_input(self, x0: torch.Tensor) -> torch.Tensor:
        """Relaxed one-hot for the reward: softmax(x0 / temperature) over the alphabet, or with
        ``straight_through`` the hard one-hot in the forward pass and the softmax's gradient backward."""
        soft = torch.softmax(x0 / self.temperature, dim=-1)
        if not self.straight_through:
            return soft
        hard = F.one_hot(x0.argmax(-1), 4).to(soft.dtype)
        return hard + soft - soft.detach()

    # ---- the forward process and pretraining
    def prior(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
        return torch.randn(n, self.length, 4, generator=generator, device=device)

    def loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM's simple loss: E_t,eps ||eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) - eps||^2."""
        n = x0.shape[0]
        t = torch.randint(1, self.steps + 1, (n,), generator=generator, device=x0.device)
        ab = self.schedule.alpha_bar.to(x0.device, torch.float32)[t][:, None, None]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        return F.mse_loss(model(x_t, t), eps)

    # ---- the reverse process
    def policy(self, model: nn.Module, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """Mean (B, L, 4) and standard deviation sigma_t of p_t(x_{t-1} | x_t) under ``model``."""
        sqrt_ab, sqrt_1mab, sqrt_ab_prev, c_eps = self.schedule.coefficients(t)
        eps = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long))
        x0_hat = (x_t - sqrt_1mab * eps) / sqrt_ab  # pred_original_sample
        if self.clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = (x_t - sqrt_ab * x0_hat) / sqrt_1mab  # the noise the clipped x0 implies
        return sqrt_ab_prev * x0_hat + c_eps * eps, self.schedule.sigma(t)

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, generator: torch.Generator | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """x0 (n, L, 4) from the model's sampler, without a graph."""
        x = self.prior(n, generator, device)
        for t in range(self.steps, 0, -1):
            mean, sigma = self.policy(model, x, t)
            x = mean + sigma * torch.randn(x.shape, generator=generator, device=x.device) if sigma > 0 else mean
        return x

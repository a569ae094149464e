"""Gaussian diffusion over one-hot sequences scaled to +-1: DDPM training, DDIM/ancestral policies.

The backbone interface the fine-tuning loop needs (``masked.MaskedDiffusion`` provides the same methods):
- ``prior(n)``: x_T;  ``steps``;  ``loss(model, x0)``: the pretraining loss;  ``sample(model, n)``;
- ``encode(codes)`` / ``decode(x0)``;  ``reward_input(x0)``: what the reward scores during fine-tuning;
- the per-step transition p_t(x_{t-1} | x_t), which the backbone owns, so that ``sampler.rollout`` and the KL
  are the same code for every backbone:
  ``policy(model, x_t, t)`` -> its parameters (here (mean, sigma));  ``net(model, x_t, t)`` -> the raw output of
  a denoiser-shaped network (the fine-tuning correction);  ``correct(pre, c, t, parameterization)`` -> the
  fine-tuned parameters from the pretrained ones and the correction;  ``noise(x_t, t, generator)`` -> the step's
  randomness (drawn outside activation checkpointing);  ``step(params, x_t, t, noise)`` -> x_{t-1};
  ``kl(params, pre, x_t, t)`` -> KL(p_t(.|x_t) || p_pre_t(.|x_t)) per sample;  ``stochastic``: whether the KL
  is defined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braid_ray.config import DiffusionConfig

from braid_ray.diffusion.schedule import Schedule


class GaussianOneHotDiffusion:
    """``clip_x0``: clip the predicted x0 to [-1, 1] at every reverse step (the data are +-1 one-hot) and take
    the noise that this x0 implies, as diffusers' DDIM ``clip_sample`` does. Without it the cosine schedule's
    last beta (0.999, so sqrt(alpha_bar_T) ~ 0.03) multiplies the first step's noise-prediction error by ~30:
    the first step's mean lands far off the data (measured 0.7 per coordinate against 0.03 on TFBind8) and
    carries most of the path's KL. With it, the Jacobian of a clipped coordinate is zero, so the reward's
    gradient hardly reaches the policy through the sampler (TFBind8, alpha 0.01, 100 steps: whole-path KL
    0.02 nats, no reward gain): off by default, until a gradient-preserving fix is chosen."""

    in_channels = 4  # the denoiser's input: x_t itself

    def __init__(self, length: int, steps: int = 50, eta: float = 1.0, temperature: float = 0.5,
                 straight_through: bool = False, clip_x0: bool = False):
        self.length, self.schedule = length, Schedule(steps, eta)
        self.temperature, self.straight_through, self.clip_x0 = temperature, straight_through, clip_x0

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, length: int, temperature: float = 0.5,
                    straight_through: bool = False) -> GaussianOneHotDiffusion:
        """From a DiffusionConfig (``diffusion.steps``, ``eta``, ``clip_x0``) and the reward's relaxation."""
        return cls(length, cfg.steps, cfg.eta, temperature, straight_through, cfg.clip_x0)

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
        return self.prediction(model, x_t, t)[0]

    def prediction(self, model: nn.Module, x_t: torch.Tensor,
                   t: int) -> tuple[tuple[torch.Tensor, float], torch.Tensor]:
        """((mean, sigma_t) of p_t(x_{t-1} | x_t), the predicted x0 (B, L, 4) that the mean is built from)."""
        sqrt_ab, sqrt_1mab, sqrt_ab_prev, c_eps = self.schedule.coefficients(t)
        eps = model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long))
        x0_hat = (x_t - sqrt_1mab * eps) / sqrt_ab  # pred_original_sample
        if self.clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = (x_t - sqrt_ab * x0_hat) / sqrt_1mab  # the noise the clipped x0 implies
        return (sqrt_ab_prev * x0_hat + c_eps * eps, self.schedule.sigma(t)), x0_hat

    @staticmethod
    def guide(params: tuple[torch.Tensor, float], grad: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
        """Classifier guidance (Dhariwal & Nichol 2021) of a step: (mean + scale sigma_t^2 grad, sigma_t), with
        ``grad`` (B, L, 4) the gradient of the guiding reward w.r.t. x0 at the step's predicted x0."""
        mean, sigma = params
        return mean + scale * sigma**2 * grad, sigma

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, generator: torch.Generator | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """x0 (n, L, 4) from the model's sampler, without a graph."""
        x = self.prior(n, generator, device)
        for t in range(self.steps, 0, -1):
            mean, sigma = self.policy(model, x, t)
            x = mean + sigma * torch.randn(x.shape, generator=generator, device=x.device) if sigma > 0 else mean
        return x

    # ---- the per-step transition, as the fine-tuning rollout uses it (params = (mean, sigma))
    @property
    def stochastic(self) -> bool:
        """Whether the steps are random (eta > 0), so that their KL is defined."""
        return self.schedule.eta > 0

    @staticmethod
    def net(model: nn.Module, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The raw output (B, L, 4) of a denoiser-shaped network at step t (an int, or one per row (B,))."""
        steps = t if torch.is_tensor(t) else torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        return model(x_t, steps)

    @staticmethod
    def correct(pre: tuple[torch.Tensor, float], c: torch.Tensor, t: int,
                parameterization: str) -> tuple[torch.Tensor, float]:
        """(mu_theta, sigma_t): ``shift`` mu_pre + sigma_t c, ``residual`` mu_pre + sigma_t^2 c."""
        mean_pre, sigma = pre
        return mean_pre + (sigma**2 if parameterization == "residual" else sigma) * c, sigma

    def correction_kl(self, c: torch.Tensor, t: torch.Tensor, parameterization: str) -> torch.Tensor:
        """KL per row (B,) of the corrected policy from the correction c (B, L, 4) alone, at steps t (B,):
        mu_theta - mu_pre = scale * c, so the pretrained model need not run (``shift`` / ``residual``)."""
        c2 = c.pow(2).sum(dim=(1, 2))  # ||c(x_t, t)||^2
        if parameterization == "shift":  # ||sigma c||^2 / (2 sigma^2)
            return c2 / 2
        sigma2 = self.schedule.sigma2.to(c.device, c.dtype)[t.long()]
        return sigma2 * c2 / 2  # residual: ||sigma^2 c||^2 / (2 sigma^2)

    @staticmethod
    def noise(x_t: torch.Tensor, t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(x_t.shape, generator=generator, device=x_t.device)

    @staticmethod
    def step(params: tuple[torch.Tensor, float], x_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} = mean + sigma_t z."""
        mean, sigma = params
        return mean + sigma * noise

    @staticmethod
    def kl(params: tuple[torch.Tensor, float], pre: tuple[torch.Tensor, float], x_t: torch.Tensor,
           t: int) -> torch.Tensor:
        """KL(N(mu_theta, sigma_t^2) || N(mu_pre, sigma_t^2)) per sample (B,):
        ||mu_theta - mu_pre||^2 / (2 sigma_t^2)."""
        (mean, sigma), (mean_pre, _) = params, pre
        return ((mean - mean_pre) ** 2).sum(dim=(1, 2)) / (2 * sigma**2)

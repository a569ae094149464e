"""Noise schedule and the per-step Gaussian policy of a DDIM/DDPM sampler (Song et al. 2021, Ho et al. 2020).

Symbols: alpha_bar_t = prod_{s<=t} (1 - beta_s), with alpha_bar_0 = 1; step t maps x_t -> x_{t-1},
t = T, ..., 1. With eta = 1 the DDIM policy is DDPM's posterior q(x_{t-1} | x_t, x0_hat).
"""

from __future__ import annotations

import math

import torch


def cosine_alpha_bar(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar_0..alpha_bar_T (T + 1 values) of the cosine schedule (Nichol & Dhariwal 2021), float64."""
    f = [math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(steps + 1)]
    alpha_bar = [1.0]
    for t in range(1, steps + 1):
        beta = min(1 - f[t] / f[t - 1], max_beta)
        alpha_bar.append(alpha_bar[-1] * (1 - beta))
    return torch.tensor(alpha_bar, dtype=torch.float64)


class Schedule:
    """Coefficients of x_{t-1} = mu(x_t, eps_hat) + sigma_t z for t = 1..T, indexed by t."""

    def __init__(self, steps: int, eta: float = 1.0):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.steps, self.eta = steps, eta
        ab = cosine_alpha_bar(steps)
        self.alpha_bar = ab  # (T + 1,)
        prev, cur = ab[:-1], ab[1:]  # alpha_bar_{t-1}, alpha_bar_t for t = 1..T
        beta = 1 - cur / prev
        # DDIM's sigma_t; at t = 1 it is 0 (alpha_bar_0 = 1), which would make the last step deterministic and
        # its KL undefined, so the last step takes DDPM's sigma_1^2 = beta_1 (times eta^2) instead.
        sigma2 = eta**2 * (1 - prev) / (1 - cur) * beta
        sigma2[0] = eta**2 * beta[0]
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.sigma2 = torch.cat([torch.zeros(1, dtype=torch.float64), sigma2])  # index t

    def coefficients(self, t: int) -> tuple[float, float, float, float]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), sqrt(alpha_bar_{t-1}), c_eps) for step t, where
        mu = sqrt(alpha_bar_{t-1}) x0_hat + c_eps eps_hat and c_eps = sqrt(1 - alpha_bar_{t-1} - sigma_t^2)."""
        ab, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t - 1])
        c_eps = math.sqrt(max(1 - ab_prev - float(self.sigma2[t]), 0.0)) if t > 1 else 0.0
        return math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_prev), c_eps

    def sigma(self, t: int) -> float:
        return math.sqrt(float(self.sigma2[t]))

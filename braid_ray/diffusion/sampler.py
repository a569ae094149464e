"""The fine-tuned policy, and a sampler that backpropagates through its last K steps with the per-step KL.

BRAID's objective (Algorithm 1, eq. 6) needs, for each sampled trajectory, x_0 with a graph to the policy's
weights and KL(p_t(.|x_t) || p_pre_t(.|x_t)) = ||mu_theta(x_t, t) - mu_pre(x_t, t)||^2 / (2 sigma_t^2)
(equal-variance Gaussians) at the visited x_t, summed over EVERY step where the policy acts. Steps T..K+1
run without a graph; each of the last K steps runs under activation checkpointing, so memory grows with K
and not with T.

The steps before the last K:
- by default (eq. 6) the fine-tuned policy acts there too and pays its KL. The KL's gradient w.r.t. theta at
  the visited (detached) x_t needs no backpropagation through the chain: the rollout keeps those x_t, and
  ``early_kl`` gives their KL with a graph to theta, for backward passes of their own (memory flat in T).
- with ``FineTunedPolicy(active_steps=K)`` the correction is switched off on steps t > K, which are then the
  pretrained policy's: their KL is exactly zero, at training and at sampling alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion


PARAMETERIZATIONS = ("residual", "shift", "full")


class FineTunedPolicy(nn.Module):
    """mu_theta and mu_pre at the same x_t. The pretrained model is frozen and never trained.

    ``residual``: mu_theta = mu_pre + sigma_t^2 * c_phi(x_t, t), with c_phi a denoiser-shaped network whose
    read-out starts at zero (so theta = pretrained at step 0, and the KL is sigma_t^2 ||c_phi||^2 / 2). This is
    the form of Theorem 1's optimal policy (the pretrained drift plus sigma_t^2 times a value gradient).
    ``shift``: mu_theta = mu_pre + sigma_t * c_phi(x_t, t), the correction in units of the step's noise, so
    KL_t = ||c_phi||^2 / 2 on every step. The same family as ``residual`` (c_phi absorbs sigma_t), but an
    O(1) output moves the mean by a noise std at every t, where ``residual`` needs outputs of order
    1/sigma_t on the late, low-noise steps: Adam reaches useful policies in far fewer steps.
    ``full``: mu_theta from a trainable copy of the pretrained denoiser.
    ``active_steps``: None = the policy acts on every step t = T..1; K = only on t <= K (pretrained before).
    """

    def __init__(self, backbone: GaussianOneHotDiffusion, pretrained: nn.Module, parameterization: str = "residual",
                 correction: nn.Module | None = None, active_steps: int | None = None):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.backbone, self.parameterization, self.active_steps = backbone, parameterization, active_steps
        self.pretrained = pretrained.eval().requires_grad_(False)
        if parameterization == "full":
            self.trainable = copy.deepcopy(pretrained).requires_grad_(True).train()
        else:
            self.trainable = correction if correction is not None else _zero_correction(pretrained)

    def acts(self, t: int) -> bool:
        """Whether the fine-tuned policy differs from the pretrained one at step t."""
        return self.active_steps is None or t <= self.active_steps

    def means(self, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mu_theta, mu_pre, sigma_t) at x_t (B, L, 4); gradients reach x_t through both means."""
        mean_pre, sigma = self.backbone.policy(self.pretrained, x_t, t)
        if not self.acts(t):
            return mean_pre, mean_pre, sigma
        if self.parameterization == "full":
            mean, _ = self.backbone.policy(self.trainable, x_t, t)
        else:
            steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            scale = sigma**2 if self.parameterization == "residual" else sigma
            mean = mean_pre + scale * self.trainable(x_t, steps)
        return mean, mean_pre, sigma

    def kl(self, x_t: torch.Tensor, t: int, mean_pre: torch.Tensor | None = None) -> torch.Tensor:
        """KL(p_t(.|x_t) || p_pre_t(.|x_t)) per sample (B,), with a graph to theta only (x_t as given).

        For ``shift`` / ``residual`` mu_theta - mu_pre = scale * c(x_t, t), so the pretrained model is not run;
        ``full`` needs ``mean_pre`` (computed on the way, without a graph)."""
        sigma = self.backbone.schedule.sigma(t)
        if self.parameterization == "full":
            mean, _ = self.backbone.policy(self.trainable, x_t, t)
            return ((mean - mean_pre) ** 2).sum(dim=(1, 2)) / (2 * sigma**2)
        steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        scale = sigma**2 if self.parameterization == "residual" else sigma
        return (scale * self.trainable(x_t, steps)).pow(2).sum(dim=(1, 2)) / (2 * sigma**2)


def _zero_correction(pretrained: nn.Module) -> nn.Module:
    """A denoiser shaped like the pretrained one whose final projection starts at zero."""
    if isinstance(pretrained, ConvDenoiser):
        inp, blocks = pretrained.inp, len(pretrained.blocks)
        net = ConvDenoiser(pretrained.length, inp.out_channels, blocks, inp.kernel_size[0], pretrained.emb_dim)
    else:
        net = copy.deepcopy(pretrained)
    last = [m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Linear))][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    return net.requires_grad_(True).train()


@dataclass
class EarlyStep:
    """A step before the last K at which the fine-tuned policy acted: where to pay its KL."""

    t: int
    x_t: torch.Tensor  # (B, L, 4), detached
    mean_pre: torch.Tensor | None  # (B, L, 4) for the ``full`` parameterization, else None


@dataclass
class Rollout:
    x0: torch.Tensor  # (B, L, 4), with a graph through the last K steps
    kl: torch.Tensor  # (B,) sum of the per-step KL over the last K steps, with a graph
    kl_per_step: torch.Tensor  # (T,) batch-mean KL of every step, t = T..1 (detached)
    kl_early: torch.Tensor  # (B,) sum of the KL over steps T..K+1 (detached; zero where the policy does not act)
    early: list[EarlyStep]  # the steps T..K+1 where the policy acts, for early_kl (empty without gradients)


def rollout(policy: FineTunedPolicy, n: int, k: int, generator: torch.Generator | None = None,
            device: torch.device | None = None, use_checkpoint: bool = True) -> Rollout:
    """Sample n trajectories from the fine-tuned policy; backpropagate through steps K..1 only, and keep the
    earlier steps where the policy acts for ``early_kl`` (when gradients are enabled)."""
    steps = policy.backbone.steps
    if not 1 <= k <= steps:
        raise ValueError(f"K must be in [1, {steps}], got {k}")
    x = policy.backbone.prior(n, generator, device)
    kl_early = torch.zeros(n, device=x.device)
    per_step, states = [], []
    keep = torch.is_grad_enabled()
    with torch.no_grad():
        for t in range(steps, k, -1):
            mean, mean_pre, sigma = policy.means(x, t)
            kl = ((mean - mean_pre) ** 2).sum(dim=(1, 2)) / (2 * sigma**2)
            kl_early += kl
            per_step.append(kl.mean())
            if keep and policy.acts(t):
                states.append(EarlyStep(t, x, mean_pre if policy.parameterization == "full" else None))
            x = mean + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    kl_total = torch.zeros(n, device=x.device)
    for t in range(k, 0, -1):
        noise = torch.randn(x.shape, generator=generator, device=x.device)  # drawn outside: recomputation is exact

        def step(x_t: torch.Tensor, noise: torch.Tensor = noise, t: int = t) -> tuple[torch.Tensor, torch.Tensor]:
            mean, mean_pre, sigma = policy.means(x_t, t)
            kl = ((mean - mean_pre) ** 2).sum(dim=(1, 2)) / (2 * sigma**2)
            return mean + sigma * noise, kl

        if use_checkpoint and torch.is_grad_enabled():
            x, kl = checkpoint(step, x, use_reentrant=False)
        else:
            x, kl = step(x)
        kl_total = kl_total + kl
        per_step.append(kl.detach().mean())
    return Rollout(x, kl_total, torch.stack(per_step), kl_early, states)


def early_kl(policy: FineTunedPolicy, states: list[EarlyStep]) -> torch.Tensor:
    """The summed KL (B,) of ``states`` (steps before the last K), with a graph to theta but not through the
    chain. ``shift`` / ``residual`` run the correction once on all the steps' rows together."""
    if policy.parameterization == "full":
        return sum(policy.kl(s.x_t, s.t, s.mean_pre) for s in states)
    b = states[0].x_t.shape[0]
    x = torch.cat([s.x_t for s in states])
    t = torch.cat([torch.full((b,), s.t, device=x.device, dtype=torch.long) for s in states])
    c2 = policy.trainable(x, t).pow(2).sum(dim=(1, 2)).view(len(states), b)  # ||c(x_t, t)||^2
    if policy.parameterization == "shift":  # ||sigma c||^2 / (2 sigma^2)
        return c2.sum(0) / 2
    sigma2 = torch.tensor([float(policy.backbone.schedule.sigma2[s.t]) for s in states], device=x.device)
    return (sigma2[:, None] * c2).sum(0) / 2  # residual: ||sigma^2 c||^2 / (2 sigma^2)

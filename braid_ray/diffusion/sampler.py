"""The fine-tuned policy, and a sampler that backpropagates through its last K steps with the per-step KL.

BRAID's objective (Algorithm 1, eq. 6) needs, for each sampled trajectory, x_0 with a graph to the policy's
weights and KL(p_t(.|x_t) || p_pre_t(.|x_t)) = ||mu_theta(x_t, t) - mu_pre(x_t, t)||^2 / (2 sigma_t^2)
(equal-variance Gaussians) at the visited x_t. Steps T..K+1 run without a graph; each of the last K steps
runs under activation checkpointing, so memory grows with K and not with T.
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
    """

    def __init__(self, backbone: GaussianOneHotDiffusion, pretrained: nn.Module, parameterization: str = "residual",
                 correction: nn.Module | None = None):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.backbone, self.parameterization = backbone, parameterization
        self.pretrained = pretrained.eval().requires_grad_(False)
        if parameterization == "full":
            self.trainable = copy.deepcopy(pretrained).requires_grad_(True).train()
        else:
            self.trainable = correction if correction is not None else _zero_correction(pretrained)

    def means(self, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mu_theta, mu_pre, sigma_t) at x_t (B, L, 4); gradients reach x_t through both means."""
        mean_pre, sigma = self.backbone.policy(self.pretrained, x_t, t)
        if self.parameterization == "full":
            mean, _ = self.backbone.policy(self.trainable, x_t, t)
        else:
            steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            scale = sigma**2 if self.parameterization == "residual" else sigma
            mean = mean_pre + scale * self.trainable(x_t, steps)
        return mean, mean_pre, sigma


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
class Rollout:
    x0: torch.Tensor  # (B, L, 4), with a graph through the last K steps
    kl: torch.Tensor  # (B,) sum of the per-step KL over the last K steps, with a graph
    kl_per_step: torch.Tensor  # (K,) batch-mean KL of each differentiable step, t = K..1 (detached)


def rollout(policy: FineTunedPolicy, n: int, k: int, generator: torch.Generator | None = None,
            device: torch.device | None = None, use_checkpoint: bool = True) -> Rollout:
    """Sample n trajectories from the fine-tuned policy; backpropagate through steps K..1 only."""
    steps = policy.backbone.steps
    if not 1 <= k <= steps:
        raise ValueError(f"K must be in [1, {steps}], got {k}")
    x = policy.backbone.prior(n, generator, device)
    with torch.no_grad():
        for t in range(steps, k, -1):
            mean, _, sigma = policy.means(x, t)
            x = mean + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    kl_total = torch.zeros(n, device=x.device)
    per_step = []
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
    return Rollout(x, kl_total, torch.stack(per_step))

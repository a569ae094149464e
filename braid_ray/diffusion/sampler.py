"""The fine-tuned policy, and a sampler that backpropagates through its last K steps with the per-step KL.

BRAID's objective (Algorithm 1, eq. 6) needs, for each sampled trajectory, x_0 with a graph to the policy's
weights and KL(p_t(.|x_t) || p_pre_t(.|x_t)) at the visited x_t, summed over EVERY step where the policy acts.
The backbone owns the step's transition, its sampling and its exact KL (``gaussian.py``: equal-variance Gaussians,
KL = ||mu_theta(x_t, t) - mu_pre(x_t, t)||^2 / (2 sigma_t^2); ``masked.py``: categorical unmasking, KL = (1 / t)
times the letters' KL at the masked positions), so this loop is the same for every backbone. Steps T..K+1 run
without a graph; each of the last K steps runs under activation checkpointing, so memory grows with K and not
with T.

The steps before the last K:
- by default (eq. 6) the fine-tuned policy acts there too and pays its KL. The KL's gradient w.r.t. theta at
  the visited (detached) x_t needs no backpropagation through the chain: the rollout keeps those x_t, and
  ``early_kl`` gives their KL with a graph to theta, for backward passes of their own (memory flat in T).
- with ``FineTunedPolicy(active_steps=K)`` the correction is switched off on steps t > K, which are then the
  pretrained policy's: their KL is exactly zero, at training and at sampling alike.

The last steps can be left to the pretrained model too (``pretrained_last=N``: steps N..1): the reward's gradient
still runs through them to x_N, but the policy cannot move their means. On the Gaussian one-hot backbone the last
step only rounds x_1 to a vertex, and a policy that controls it can raise the reward on the relaxed x0 by
shifting x0 within its argmax cell, which changes no design (benchmarks/relaxation_gap.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.masked import MaskedDiffusion

PARAMETERIZATIONS = ("residual", "shift", "full")
# A step's transition p_t(. | x_t), as its backbone parameterises it: (mean, sigma) for the Gaussian backbone,
# the x0 logits (B, L, 4) for the masked one.
Transition = Any


class FineTunedPolicy(nn.Module):
    """The fine-tuned transition p_t and the pretrained p_pre_t at the same x_t. The pretrained model is frozen and
    never trained.

    Gaussian backbone (the policy's mean mu):
    ``residual``: mu_theta = mu_pre + sigma_t^2 * c_phi(x_t, t), with c_phi a denoiser-shaped network whose
    read-out starts at zero (so theta = pretrained at step 0, and the KL is sigma_t^2 ||c_phi||^2 / 2). This is
    the form of Theorem 1's optimal policy (the pretrained drift plus sigma_t^2 times a value gradient).
    ``shift``: mu_theta = mu_pre + sigma_t * c_phi(x_t, t), the correction in units of the step's noise, so
    KL_t = ||c_phi||^2 / 2 on every step. The same family as ``residual`` (c_phi absorbs sigma_t), but an
    O(1) output moves the mean by a noise std at every t, where ``residual`` needs outputs of order
    1/sigma_t on the late, low-noise steps: Adam reaches useful policies in far fewer steps.
    Masked backbone: ``shift`` and ``residual`` alike add c_phi to the pretrained x0 logits,
    p_theta(. | x_t) = softmax(logits_pre(x_t, t) + c_phi(x_t, t)).
    ``full``: the transition of a trainable copy of the pretrained denoiser.
    ``active_steps``: None = the policy acts on every step t = T..1; K = only on t <= K (pretrained before).
    ``pretrained_last``: N = the last N steps (t <= N) are the pretrained model's; 0 = the policy acts on them.
    """

    def __init__(self, backbone: GaussianOneHotDiffusion | MaskedDiffusion, pretrained: nn.Module,
                 parameterization: str = "residual", correction: nn.Module | None = None,
                 active_steps: int | None = None, pretrained_last: int = 0):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.backbone, self.parameterization, self.active_steps = backbone, parameterization, active_steps
        self.pretrained_last = pretrained_last
        self.pretrained = pretrained.eval().requires_grad_(False)
        if parameterization == "full":
            self.trainable = copy.deepcopy(pretrained).requires_grad_(True).train()
        else:
            self.trainable = correction if correction is not None else _zero_correction(pretrained)
        # Whether the KL follows from the correction alone (a Gaussian shift / residual: mu_theta - mu_pre =
        # scale * c), so that paying it needs no pretrained pass and keeps no pretrained output.
        self.kl_from_correction = parameterization != "full" and hasattr(backbone, "correction_kl")

    def acts(self, t: int) -> bool:
        """Whether the fine-tuned policy differs from the pretrained one at step t."""
        return t > self.pretrained_last and (self.active_steps is None or t <= self.active_steps)

    def transition(self, x_t: torch.Tensor, t: int) -> tuple[Transition, Transition]:
        """(p_t, p_pre_t) at x_t (B, L, 4), as the backbone's transition parameters; gradients reach x_t through
        both."""
        pre = self.backbone.policy(self.pretrained, x_t, t)
        if not self.acts(t):
            return pre, pre
        return self.fine_tuned(x_t, t, pre), pre

    def fine_tuned(self, x_t: torch.Tensor, t: int, pre: Transition) -> Transition:
        """p_t at x_t, given p_pre_t there (``pre``)."""
        if self.parameterization == "full":
            return self.backbone.policy(self.trainable, x_t, t)
        return self.backbone.correct(pre, self.backbone.net(self.trainable, x_t, t), t, self.parameterization)

    def means(self, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The Gaussian backbone's (mu_theta, mu_pre, sigma_t) at x_t (B, L, 4)."""
        (mean, sigma), (mean_pre, _) = self.transition(x_t, t)
        return mean, mean_pre, sigma

    def kl(self, x_t: torch.Tensor, t: int, pre: Transition | None = None) -> torch.Tensor:
        """KL(p_t(.|x_t) || p_pre_t(.|x_t)) per sample (B,), with a graph to theta only (x_t as given).

        Where the KL follows from the correction alone (``kl_from_correction``) the pretrained model is not run;
        otherwise ``pre`` is p_pre_t at x_t (computed on the way, without a graph)."""
        if self.kl_from_correction:
            steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            c = self.backbone.net(self.trainable, x_t, steps)
            return self.backbone.correction_kl(c, steps, self.parameterization)
        return self.backbone.kl(self.fine_tuned(x_t, t, pre), pre, x_t, t)


def _zero_correction(pretrained: nn.Module) -> nn.Module:
    """A denoiser shaped like the pretrained one whose final projection starts at zero."""
    if isinstance(pretrained, ConvDenoiser):
        inp, blocks = pretrained.inp, len(pretrained.blocks)
        net = ConvDenoiser(pretrained.length, inp.out_channels, blocks, inp.kernel_size[0], pretrained.emb_dim,
                           inp.in_channels)
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
    pre: Transition | None  # p_pre_t at x_t (detached), unless the KL follows from the correction alone


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
    backbone = policy.backbone
    steps = backbone.steps
    if not 1 <= k <= steps:
        raise ValueError(f"K must be in [1, {steps}], got {k}")
    x = backbone.prior(n, generator, device)
    kl_early = torch.zeros(n, device=x.device)
    per_step, states = [], []
    keep = torch.is_grad_enabled()
    with torch.no_grad():
        for t in range(steps, k, -1):
            p, pre = policy.transition(x, t)
            kl = backbone.kl(p, pre, x, t)
            kl_early += kl
            per_step.append(kl.mean())
            if keep and policy.acts(t):
                states.append(EarlyStep(t, x, None if policy.kl_from_correction else pre))
            x = backbone.step(p, x, t, backbone.noise(x, t, generator))
    kl_total = torch.zeros(n, device=x.device)
    for t in range(k, 0, -1):
        noise = backbone.noise(x, t, generator)  # drawn outside: recomputation is exact

        def step(x_t: torch.Tensor, noise: torch.Tensor = noise, t: int = t) -> tuple[torch.Tensor, torch.Tensor]:
            p, pre = policy.transition(x_t, t)
            kl = backbone.kl(p, pre, x_t, t)
            return backbone.step(p, x_t, t, noise), kl

        if use_checkpoint and torch.is_grad_enabled():
            x, kl = checkpoint(step, x, use_reentrant=False)
        else:
            x, kl = step(x)
        kl_total = kl_total + kl
        per_step.append(kl.detach().mean())
    return Rollout(x, kl_total, torch.stack(per_step), kl_early, states)


def early_kl(policy: FineTunedPolicy, states: list[EarlyStep]) -> torch.Tensor:
    """The summed KL (B,) of ``states`` (steps before the last K), with a graph to theta but not through the
    chain. The network runs once on all the steps' rows where the backbone allows: where the KL follows from the
    correction alone, or where its transition takes one step per row (``steps_per_row``)."""
    backbone, b = policy.backbone, states[0].x_t.shape[0]
    if not (policy.kl_from_correction or getattr(backbone, "steps_per_row", False)):
        return sum(policy.kl(s.x_t, s.t, s.pre) for s in states)
    x = torch.cat([s.x_t for s in states])
    t = torch.cat([torch.full((b,), s.t, device=x.device, dtype=torch.long) for s in states])
    if policy.kl_from_correction:
        kl = backbone.correction_kl(backbone.net(policy.trainable, x, t), t, policy.parameterization)
    else:
        pre = torch.cat([s.pre for s in states])
        kl = backbone.kl(policy.fine_tuned(x, t, pre), pre, x, t)
    return kl.view(len(states), b).sum(0)

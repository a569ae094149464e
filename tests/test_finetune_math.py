"""The sampler, the per-step KL and the fine-tuning loop against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.sampler import FineTunedPolicy, rollout
from braid_ray.diffusion.schedule import Schedule, cosine_alpha_bar
from braid_ray.finetune import FineTuner


def _policy(parameterization: str = "full", steps: int = 8, length: int = 6) -> FineTunedPolicy:
    torch.manual_seed(0)
    backbone = GaussianOneHotDiffusion(length, steps=steps, eta=1.0)
    return FineTunedPolicy(backbone, ConvDenoiser(length, 8, 1, 3, 8), parameterization)


def _reward(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = x0[..., 0].sum(1)
    return r, torch.zeros_like(r)


def test_schedule_matches_ddpm_posterior_variance_at_eta_one() -> None:
    s = Schedule(10, eta=1.0)
    ab = cosine_alpha_bar(10)
    assert ab[0] == 1.0 and (ab[1:] < ab[:-1]).all()
    for t in range(2, 11):  # DDPM's posterior variance beta_tilde_t = (1 - ab_{t-1}) / (1 - ab_t) * beta_t
        beta = 1 - ab[t] / ab[t - 1]
        assert s.sigma2[t].item() == pytest.approx(((1 - ab[t - 1]) / (1 - ab[t]) * beta).item())
    assert s.sigma2[1].item() == pytest.approx((1 - ab[1]).item())  # last step: sigma_1^2 = beta_1
    assert Schedule(10, eta=0.0).sigma(5) == 0.0


def test_policy_mean_inverts_the_forward_process_for_a_perfect_denoiser() -> None:
    """With the true noise, x0_hat = x0 and the DDIM mean is sqrt(ab_{t-1}) x0 + c_eps eps."""
    backbone = GaussianOneHotDiffusion(4, steps=10, eta=0.5)
    x0 = backbone.encode(torch.randint(0, 4, (3, 4)))
    eps = torch.randn(3, 4, 4)
    t = 6
    sa, s1a, sap, c_eps = backbone.schedule.coefficients(t)
    x_t = sa * x0 + s1a * eps

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            return eps

    mean, sigma = backbone.policy(Oracle(), x_t, t)
    torch.testing.assert_close(mean, sap * x0 + c_eps * eps, atol=1e-5, rtol=1e-5)
    assert c_eps**2 + sigma**2 == pytest.approx(1 - sap**2, abs=1e-6)  # DDIM keeps q(x_{t-1} | x0)


@pytest.mark.parametrize("parameterization", ["residual", "shift", "full"])
def test_kl_is_zero_at_the_pretrained_policy(parameterization: str) -> None:
    roll = rollout(_policy(parameterization), 16, k=8)
    assert roll.kl.abs().max().item() < 1e-10 and roll.kl_per_step.shape == (8,)


def test_kl_is_the_closed_form_gaussian_kl() -> None:
    policy = _policy("residual")
    with torch.no_grad():
        for p in policy.trainable.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_t = torch.randn(5, 6, 4)
    mean, mean_pre, sigma = policy.means(x_t, 3)
    kl = ((mean - mean_pre) ** 2).sum((1, 2)) / (2 * sigma**2)
    p = torch.distributions.Normal(mean, sigma)
    q = torch.distributions.Normal(mean_pre, sigma)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).sum((1, 2)), atol=1e-4, rtol=1e-4)


def test_no_gradient_reaches_the_network_from_steps_before_t_minus_k() -> None:
    """Steps T..K+1 run the network without a graph; only steps K..1 are recorded for backward."""
    k = 3
    policy2 = _policy("full", steps=8)
    calls = []
    h = policy2.trainable.register_forward_hook(lambda m, i, o: calls.append((int(i[1][0]), o.requires_grad)))
    roll = rollout(policy2, 4, k, use_checkpoint=False)
    h.remove()
    assert all(not grad for t, grad in calls if t > k) and all(grad for t, grad in calls if t <= k)
    assert roll.x0.requires_grad


def test_truncated_sampler_memory_does_not_grow_with_t() -> None:
    """The autograd graph holds only the last K steps: its saved tensors do not depend on T."""
    def saved_bytes(steps: int) -> int:
        policy = _policy("full", steps=steps)
        total = 0

        def pack(t: torch.Tensor):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            roll = rollout(policy, 32, k=4, generator=torch.Generator().manual_seed(0))
        roll.x0.sum().backward()
        return total

    small, large = saved_bytes(10), saved_bytes(40)
    assert small > 0 and abs(large - small) / small < 0.05


def test_optimizer_is_created_once_and_its_state_persists() -> None:
    policy = _policy("residual")
    tuner = FineTuner(policy, _reward, alpha=0.1, k=4, batch_size=8, lr=1e-2, steps=3)
    opt = tuner.optimizer
    tuner.train_step()
    first = {id(p): s["step"].item() for p, s in opt.state.items()}
    tuner.train_step()
    assert tuner.optimizer is opt and all(s["step"].item() == first[id(p)] + 1 for p, s in opt.state.items())
    state = tuner.state_dict()
    other = FineTuner(_policy("residual"), _reward, alpha=0.1, k=4, batch_size=8, lr=1e-2, steps=3)
    other.load_state_dict(state)
    assert other.step == 2 and torch.equal(other.generator.get_state(), tuner.generator.get_state())


def test_fine_tuning_raises_the_reward_and_pays_kl() -> None:
    policy = _policy("residual", steps=6)
    tuner = FineTuner(policy, _reward, alpha=0.01, k=6, batch_size=64, lr=5e-3, steps=40, seed=0)
    history = tuner.train()
    assert history[-1]["r_hat"] > history[0]["r_hat"] + 0.5
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-9) and history[-1]["kl"] > 0


def test_nan_loss_stops_with_a_clear_error() -> None:
    def bad(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x0.sum((1, 2)) * math.nan
        return r, torch.zeros_like(r)

    tuner = FineTuner(_policy("residual"), bad, alpha=0.1, k=2, batch_size=4, lr=1e-3, steps=2)
    before = {k: v.clone() for k, v in tuner.policy.trainable.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient"):
        tuner.train_step()
    assert all(torch.equal(before[k], v) for k, v in tuner.policy.trainable.state_dict().items())


def _perturbed(parameterization: str, steps: int = 8, active_steps: int | None = None) -> FineTunedPolicy:
    policy = _policy(parameterization, steps=steps)
    policy.active_steps = active_steps
    with torch.no_grad():
        for p in policy.trainable.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


@pytest.mark.parametrize("parameterization", ["residual", "shift", "full"])
def test_the_kl_covers_every_step_where_the_policy_acts(parameterization: str) -> None:
    """A policy that acts on all T steps pays KL on all T: the early steps' KL, recomputed by brute force at
    the visited x_t, equals what the rollout reports, and early_kl's gradient equals the brute-force one."""
    from braid_ray.diffusion.sampler import early_kl

    policy = _perturbed(parameterization)
    roll = rollout(policy, 6, k=3, generator=torch.Generator().manual_seed(1))
    assert roll.kl_per_step.shape == (8,) and (roll.kl_per_step > 0).all()
    assert [s.t for s in roll.early] == [8, 7, 6, 5, 4]
    brute = sum(((m - mp) ** 2).sum((1, 2)) / (2 * sg**2)
                for m, mp, sg in (policy.means(s.x_t, s.t) for s in roll.early))
    torch.testing.assert_close(roll.kl_early, brute.detach(), rtol=1e-4, atol=1e-6)
    paid = early_kl(policy, roll.early)
    torch.testing.assert_close(paid.detach(), roll.kl_early, rtol=1e-4, atol=1e-6)
    params = list(policy.trainable.parameters())
    grads = torch.autograd.grad(paid.mean(), params)
    expected = torch.autograd.grad(brute.mean(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def test_switched_off_early_steps_are_the_pretrained_policys() -> None:
    """active_steps=K: steps T..K+1 sample exactly as the pretrained model and pay no KL."""
    policy = _perturbed("shift", active_steps=3)
    roll = rollout(policy, 6, k=3, generator=torch.Generator().manual_seed(2))
    assert roll.early == [] and torch.equal(roll.kl_early, torch.zeros(6))
    assert (roll.kl_per_step[:5] == 0).all() and (roll.kl_per_step[5:] > 0).all()
    with torch.no_grad():
        x = policy.backbone.prior(6, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(4)
        for t in range(8, 3, -1):
            mean, mean_pre, sigma = policy.means(x, t)
            assert torch.equal(mean, mean_pre)
            x = mean + sigma * torch.randn(x.shape, generator=g)


def test_the_last_steps_can_stay_the_pretrained_models() -> None:
    """pretrained_last=N: steps N..1 are the pretrained model's (KL 0, the same means), the policy acts before
    them, and the reward's gradient reaches its weights through the pretrained steps."""
    policy = _perturbed("shift")
    policy.pretrained_last = 2
    roll = rollout(policy, 6, k=3, generator=torch.Generator().manual_seed(2))
    assert (roll.kl_per_step[-2:] == 0).all() and (roll.kl_per_step[:-2] > 0).all()
    assert roll.kl.mean().item() == pytest.approx(roll.kl_per_step[-3].item())  # K = 3: only step 3 pays
    grads = torch.autograd.grad(roll.x0.sum(), list(policy.trainable.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    x = policy.backbone.prior(6, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in (2, 1):
            mean, mean_pre, _ = policy.means(x, t)
            assert torch.equal(mean, mean_pre)
        mean, mean_pre, _ = policy.means(x, 3)
        assert not torch.equal(mean, mean_pre)


def test_the_fine_tuner_pays_and_reports_the_whole_paths_kl() -> None:
    tuner = FineTuner(_perturbed("shift"), _reward, alpha=0.5, k=2, batch_size=16, lr=1e-2, steps=3, seed=0)
    m = tuner.train_step()
    assert m.kl_early > 0 and m.kl > m.kl_early  # 6 early steps + 2 differentiable ones
    # The early KL's gradient reaches the weights: with a zero reward, one step lowers the early KL.
    zero = FineTuner(_perturbed("shift"), lambda x: (torch.zeros(len(x)), torch.zeros(len(x))), alpha=1.0, k=1,
                     batch_size=64, lr=1e-2, steps=20, seed=0, lr_schedule="constant")
    history = zero.train()
    assert history[-1]["kl_early"] < 0.5 * history[0]["kl_early"]

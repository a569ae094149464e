"""The masked (absorbing-state) backbone against its definitions, by exact enumeration where the space allows.

Small lengths make every state enumerable: a position is one of four letters or the mask, so L = 3 has 5^3 = 125
states and 4^3 = 64 sequences. ``TableDenoiser`` is a denoiser that can be any function of the state (one row
of logits per state), so the brute-force references below need no trained network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from braid_ray import pipeline
from braid_ray.config import ConfigError, load_config
from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.likelihood import elbo, elbo_terms, unsupported
from braid_ray.diffusion.masked import MIN_TIME, MaskedDiffusion
from braid_ray.diffusion.sampler import FineTunedPolicy, early_kl, rollout
from braid_ray.finetune import FineTuner
from braid_ray.methods import METHODS, label
from tests.conftest import ROOT
from tests.tiny import tiny_config


class TableDenoiser(nn.Module):
    """x0 logits (B, L, 4) looked up by state: one row of logits per state of the L positions; time is ignored."""

    def __init__(self, length: int, table: torch.Tensor | None = None):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(5**length, length, 4) if table is None else table.clone())
        self.register_buffer("radix", 5 ** torch.arange(length))

    def forward(self, features: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.table[(features.argmax(-1) * self.radix).sum(-1)]


def _digits(length: int) -> torch.Tensor:
    """(5^L, L): state i's value per position, (i // 5^l) % 5, with 4 the mask."""
    i = torch.arange(5**length)[:, None]
    return (i // 5 ** torch.arange(length)) % 5


def _states(digits: torch.Tensor) -> torch.Tensor:
    """Every state as x_t (5^L, L, 4): a letter's one-hot scaled to +-1, a masked position all -1."""
    return torch.where((digits == 4)[..., None], -1.0, torch.nn.functional.one_hot(digits.clamp(max=3), 4) * 2.0 - 1)


def _transition_matrix(logits: torch.Tensor, digits: torch.Tensor, t: int) -> torch.Tensor:
    """M[s, s'] = p(x_{t-1} = s' | x_t = s) (float64), written out from the definition: each masked position
    independently unmasks to letter j with probability p(j | s) / t or stays masked with (t - 1) / t; each letter is
    carried over."""
    masked = (digits == 4)[..., None]
    p = torch.softmax(logits.double(), -1)
    unmask = torch.cat([p / t, torch.full_like(p[..., :1], (t - 1) / t)], -1)
    outcome = torch.where(masked, unmask, torch.nn.functional.one_hot(digits, 5).double())  # (S, L, 5)
    m = torch.ones(len(digits), len(digits), dtype=torch.float64)
    for pos in range(digits.shape[1]):
        m = m * outcome[:, pos, :][:, digits[:, pos]]
    return m


def _exact(policy: FineTunedPolicy, fine_tuned: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(x_0) over the 4^L sequences in state order, the whole path's expected KL) of ``policy`` (or of its
    pretrained sampler), by propagating the state distribution through the T steps; differentiable in theta."""
    backbone = policy.backbone
    digits = _digits(backbone.length)
    x = _states(digits)
    occupancy = torch.zeros(len(digits), dtype=torch.float64)
    occupancy[-1] = 1.0  # x_T: every position masked
    path_kl = torch.zeros((), dtype=torch.float64)
    for t in range(backbone.steps, 0, -1):
        logits, logits_pre = policy.transition(x, t)
        if not fine_tuned:
            logits = logits_pre
        path_kl = path_kl + occupancy @ backbone.kl(logits, logits_pre, x, t).double()
        occupancy = occupancy @ _transition_matrix(logits, digits, t)
    return occupancy[(digits < 4).all(1)], path_kl


def _sequence_index(codes: torch.Tensor) -> torch.Tensor:
    """The position of each code row (N, L) in the state order of ``_exact``'s distribution."""
    return (codes * 4 ** torch.arange(codes.shape[1])).sum(1)


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def _perturbed_conv(steps: int, length: int = 4, parameterization: str = "shift") -> FineTunedPolicy:
    torch.manual_seed(0)
    policy = FineTunedPolicy(MaskedDiffusion(length, steps=steps), ConvDenoiser(length, 8, 1, 3, 8, in_channels=5),
                             parameterization)
    with torch.no_grad():
        for p in policy.trainable.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


# ---- pretraining: the masked loss


def test_the_masked_loss_is_the_continuous_time_nelbo_by_brute_force() -> None:
    """L = 2, a random state-dependent denoiser, random data over the 16 sequences. The expected loss is
    sum_x p(x) sum_M w(|M|) sum_{l in M} -log p(x_l | x masked at M) / L, with w(m) = the mean over s ~ U[MIN_TIME, 1]
    of P(M | s) / s = s^(m-1) (1 - s)^(L-m) (weight 1/s, each position masked with probability s); the estimator's
    average must match it, and a loss without the 1/s weight must not."""
    torch.manual_seed(0)
    length, torch_gen = 2, torch.Generator().manual_seed(0)
    model = TableDenoiser(length, torch.randn(25, length, 4, generator=torch_gen))
    backbone = MaskedDiffusion(length, steps=10)
    p_data = torch.distributions.Dirichlet(torch.ones(16)).sample()
    codes = torch.stack([torch.arange(16) % 4, torch.arange(16) // 4], 1)  # sequence i = (i % 4, i // 4)

    def w(m: int, weighted: bool = True) -> float:  # (1 / (1 - a)) int_a^1 s^(m-1 or m) (1 - s)^(L-m) ds
        b, power = length - m, m if weighted else m + 1
        return sum(math.comb(b, i) * (-1) ** i * (1 - MIN_TIME ** (power + i)) / (power + i)
                   for i in range(b + 1)) / (1 - MIN_TIME)

    exact, unweighted = 0.0, 0.0
    with torch.no_grad():
        for x, p in zip(codes, p_data):
            for mask in ([True, False], [False, True], [True, True]):
                z = backbone.encode(x[None])[0].clone()
                z[torch.tensor(mask)] = -1.0
                log_p = torch.log_softmax(model(backbone.features(z[None]), torch.zeros(1))[0], -1)
                nll = float(-log_p[torch.arange(length), x][torch.tensor(mask)].sum())
                exact += float(p) * w(sum(mask)) * nll / length
                unweighted += float(p) * w(sum(mask), weighted=False) * nll / length
        draws = []
        for _ in range(20):
            rows = codes[torch.multinomial(p_data, 20_000, replacement=True, generator=torch_gen)]
            draws.append(float(backbone.loss(model, backbone.encode(rows), torch_gen)))
    mean, se = np.mean(draws), np.std(draws, ddof=1) / math.sqrt(len(draws))
    assert abs(mean - exact) < 4 * se + 1e-3, (mean, exact, se)
    assert abs(unweighted - exact) > 10 * (4 * se + 1e-3), "the test must tell the weight 1/s from 1"


def test_pretraining_learns_the_data_and_samples_hold_no_mask_token() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = MaskedDiffusion(4, steps=8)
    model = ConvDenoiser(4, 16, 1, 3, 16, in_channels=5)
    data = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 0]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = backbone.loss(model, backbone.encode(data[torch.randint(0, 2, (128,), generator=g)]), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0 = backbone.sample(model, 2000, g)
    assert not backbone.masked(x0).any() and set(x0.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(backbone.reward_input(x0).sum(-1), torch.ones(2000, 4))  # one letter per position
    codes = backbone.decode(x0)
    share = sum(float((codes == d).all(1).float().mean()) for d in data)
    assert share > 0.7, share
    roll = rollout(FineTunedPolicy(backbone, model, "shift"), 64, k=3, generator=g)
    assert not backbone.masked(roll.x0).any()
    nats = elbo(backbone, model, np.array([[0, 1, 2, 3], [3, 3, 0, 0], [1, 0, 3, 2]]), t_samples=8)
    assert nats[0] > nats[2] + 2 and nats[1] > nats[2] + 2 and (nats <= 0).all()
    assert unsupported(backbone) is None


# ---- the likelihood


def test_the_elbo_is_the_t_step_bound_by_brute_force_and_below_the_exact_log_likelihood() -> None:
    """L = 2, T = 4, a random state-dependent denoiser. The bound sum_t (1/t) E_{z_t}[sum_{masked} -log p] is
    computed by enumerating the masks; the estimator averages to it; it lies below log p_theta(x), the sampler's
    exact probability (enumerated over its paths)."""
    length, steps = 2, 4
    g = torch.Generator().manual_seed(1)
    model = TableDenoiser(length, torch.randn(25, length, 4, generator=g) * 1.5)
    backbone = MaskedDiffusion(length, steps=steps)
    codes = torch.stack([torch.arange(16) % 4, torch.arange(16) // 4], 1)
    exact = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        for t in range(1, steps + 1):
            q = t / steps
            for mask in ([True, False], [False, True], [True, True]):
                m = sum(mask)
                z = backbone.encode(codes).clone()
                z[:, torch.tensor(mask)] = -1.0
                log_p = torch.log_softmax(model(backbone.features(z), torch.zeros(16)), -1).double()
                nll = -log_p.gather(-1, codes[..., None]).squeeze(-1)[:, torch.tensor(mask)].sum(1)
                exact -= q**m * (1 - q) ** (length - m) * nll / t
        p_model, _ = _exact(FineTunedPolicy(backbone, model, "shift", correction=TableDenoiser(length)), False)
    log_lik = torch.log(p_model[_sequence_index(codes)])
    assert (exact <= log_lik + 1e-9).all() and (log_lik - exact).max() > 1e-3  # a bound, and not an identity
    repeats = 4000
    draws = elbo(backbone, model, np.repeat(codes.numpy(), repeats, 0), t_samples=steps, common_noise=False, seed=3)
    draws = draws.reshape(16, repeats)
    se = draws.std(1, ddof=1) / math.sqrt(repeats)
    np.testing.assert_array_less(np.abs(draws.mean(1) - exact.numpy()), 4 * se + 1e-3)
    terms = elbo_terms(backbone, model, codes.numpy(), t_samples=2, seed=0)
    assert (terms["prior"] == 0).all() and (terms["reconstruction"] == 0).all() and (terms["elbo"] <= 0).all()
    common = elbo(backbone, model, codes.numpy(), seed=5)
    np.testing.assert_array_equal(common, elbo(backbone, model, codes.numpy()[::-1], seed=5)[::-1])


# ---- the per-step transition and its KL


def test_the_per_step_kl_is_the_categorical_kl_of_the_whole_transition() -> None:
    """At every one of the 125 states (L = 3) and every step t: the backbone's KL equals the brute-force KL
    sum_{s'} P(s'|s) log(P(s'|s) / P_pre(s'|s)) of the joint transition over all 125 next states; and the sampler
    draws from that transition."""
    length, steps = 3, 4
    g = torch.Generator().manual_seed(2)
    pretrained = TableDenoiser(length, torch.randn(125, length, 4, generator=g))
    policy = FineTunedPolicy(MaskedDiffusion(length, steps=steps), pretrained, "shift",
                             correction=TableDenoiser(length, torch.randn(125, length, 4, generator=g)))
    backbone, digits = policy.backbone, _digits(length)
    x = _states(digits)
    with torch.no_grad():
        for t in range(steps, 0, -1):
            logits, logits_pre = policy.transition(x, t)
            m, m_pre = _transition_matrix(logits, digits, t), _transition_matrix(logits_pre, digits, t)
            support = m > 0
            brute = torch.where(support, m * (m.clamp_min(1e-300).log() - m_pre.clamp_min(1e-300).log()), 0).sum(1)
            np.testing.assert_allclose(backbone.kl(logits, logits_pre, x, t).numpy(), brute.numpy(), rtol=1e-4,
                                       atol=1e-6)
        assert backbone.kl(logits, logits_pre, x, 1)[(digits < 4).all(1)].abs().max() == 0  # nothing masked: no KL
        # the sampler's draws at a partially masked state (letter, mask, mask) follow M[s]
        state, t, n = int((torch.tensor([2, 4, 4]) * 5 ** torch.arange(3)).sum()), 3, 40_000
        x_t = x[state].expand(n, -1, -1)
        logits, _ = policy.transition(x_t, t)
        nxt = backbone.step(logits, x_t, t, backbone.noise(x_t, t, g))
        d = torch.where(backbone.masked(nxt), 4, nxt.argmax(-1))
        freq = torch.bincount((d * 5 ** torch.arange(3)).sum(1), minlength=125).double() / n
        row = _transition_matrix(policy.transition(x, t)[0], digits, t)[state]
        assert _tv(freq, row) < 0.02


def test_theorem_1_by_exact_enumeration_over_4_cubed_sequences() -> None:
    """The optimum of E[r(x_0)] - alpha * sum_t E[KL_t] samples p_pre(x) exp(r(x) / alpha) / Z, and its value is
    alpha log Z (Theorem 1; Donsker-Varadhan on path space).

    L = 3, T = 4. The pretrained sampler draws the three positions independently (a state-independent table) and
    r is additive, so the optimal policy is one of the family's (a state-dependent table of logit corrections):
    the test measures the KL, not the family. The objective is computed exactly (the state distribution propagated
    through the steps, the backbone's per-step KL at every state) and maximised by Adam; a KL with the wrong
    weight per step, or paid on some steps only, reaches another distribution and fails. Then the sampler of the
    optimised policy is checked against the enumeration: its histogram, and the whole path's KL that rollout reports
    with K < T."""
    length, steps, alpha = 3, 4, 0.5
    g = torch.Generator().manual_seed(3)
    pretrained = TableDenoiser(length, (1.5 * torch.randn(length, 4, generator=g)).expand(125, -1, -1))
    w = torch.randn(length, 4, generator=g, dtype=torch.float64)
    codes = _digits(length)[(_digits(length) < 4).all(1)]  # the 64 sequences in _exact's order
    r = w[torch.arange(length), codes].sum(1)  # (64,)
    policy = FineTunedPolicy(MaskedDiffusion(length, steps=steps), pretrained, "shift",
                             correction=TableDenoiser(length))
    with torch.no_grad():
        p_pre, _ = _exact(policy, fine_tuned=False)
    z = (p_pre * torch.exp(r / alpha)).sum()
    target = p_pre * torch.exp(r / alpha) / z
    assert _tv(p_pre, target) > 0.3, "the test needs a target far from p_pre"
    opt = torch.optim.Adam(policy.trainable.parameters(), lr=0.1)
    for _ in range(300):
        p, path_kl = _exact(policy)
        objective = (p * r).sum() - alpha * path_kl
        assert float(objective.detach()) <= alpha * math.log(z) + 1e-6  # no policy beats the bound
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    with torch.no_grad():
        p, path_kl = _exact(policy)
    assert _tv(p, target) < 0.01, _tv(p, target)
    assert float((p * r).sum() - alpha * path_kl) == pytest.approx(alpha * math.log(z), abs=1e-3)

    with torch.no_grad():  # the sampler and its reported KL against the enumeration, K = 2 of T = 4
        roll = rollout(policy, 40_000, k=2, generator=g)
    hist = torch.bincount(_sequence_index(policy.backbone.decode(roll.x0)), minlength=64).double() / 40_000
    assert _tv(hist, p) < 0.03
    paid = (roll.kl + roll.kl_early).double()
    assert abs(float(paid.mean()) - float(path_kl)) < 4 * float(paid.std()) / math.sqrt(len(paid)) + 1e-4


@pytest.mark.parametrize("parameterization", ["shift", "full"])
def test_the_kl_covers_every_step_and_early_kl_has_the_brute_force_gradient(parameterization: str) -> None:
    policy = _perturbed_conv(steps=8, parameterization=parameterization)
    roll = rollout(policy, 6, k=3, generator=torch.Generator().manual_seed(1))
    assert roll.kl_per_step.shape == (8,) and (roll.kl_per_step > 0).all()
    assert [s.t for s in roll.early] == [8, 7, 6, 5, 4]
    brute = sum(policy.backbone.kl(*policy.transition(s.x_t, s.t), s.x_t, s.t) for s in roll.early)
    torch.testing.assert_close(roll.kl_early, brute.detach(), rtol=1e-4, atol=1e-6)
    paid = early_kl(policy, roll.early)
    torch.testing.assert_close(paid.detach(), roll.kl_early, rtol=1e-4, atol=1e-6)
    params = list(policy.trainable.parameters())
    for got, expected in zip(torch.autograd.grad(paid.mean(), params), torch.autograd.grad(brute.mean(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
    fresh = FineTunedPolicy(policy.backbone, policy.pretrained, "shift")  # zero correction: the pretrained policy
    assert rollout(fresh, 8, k=8).kl.abs().max() == 0


# ---- differentiable sampling


@pytest.mark.parametrize("parameterization", ["shift", "full"])
def test_the_reward_sees_an_exact_one_hot_forward_and_a_soft_gradient_backward(parameterization: str) -> None:
    policy = _perturbed_conv(steps=6, parameterization=parameterization)
    roll = rollout(policy, 16, k=6, generator=torch.Generator().manual_seed(4))
    seen = policy.backbone.reward_input(roll.x0)
    assert set(seen.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(seen.detach().sum(-1), torch.ones(16, 4))
    assert torch.equal(seen.detach().argmax(-1), policy.backbone.decode(roll.x0))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    (seen * w).sum().backward()
    grads = [p.grad for p in policy.trainable.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_sampler_memory_does_not_grow_with_t() -> None:
    """The autograd graph holds only the last K steps: its saved tensors do not depend on T."""
    def saved_bytes(steps: int) -> int:
        policy = _perturbed_conv(steps=steps)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            roll = rollout(policy, 32, k=4, generator=torch.Generator().manual_seed(0))
        (policy.backbone.reward_input(roll.x0).sum() + roll.kl.sum()).backward()
        return total

    small, large = saved_bytes(10), saved_bytes(40)
    assert small > 0 and abs(large - small) / small < 0.05


def test_fine_tuning_raises_the_reward_and_pays_the_whole_paths_kl() -> None:
    policy = _perturbed_conv(steps=6)
    policy.trainable = FineTunedPolicy(policy.backbone, policy.pretrained, "shift").trainable  # start at p_pre

    def reward(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = policy.backbone.reward_input(x0)[..., 0].sum(1)  # the number of A
        return r, torch.zeros_like(r)

    tuner = FineTuner(policy, reward, alpha=0.05, k=2, batch_size=64, lr=2e-2, steps=25, seed=0)
    history = tuner.train()
    assert history[0]["kl"] == 0 and history[-1]["kl_early"] > 0 and history[-1]["kl"] > history[-1]["kl_early"]
    assert np.mean([h["r_hat"] for h in history[-5:]]) > history[0]["r_hat"] + 0.5
    assert all(h["onehot_distance"] == 0 for h in history)


# ---- configuration and the pipeline


def test_config_accepts_masked_and_refuses_the_gaussian_only_settings() -> None:
    for name in ("tfbind8_masked.yaml", "utr_mrl_masked.yaml"):
        assert load_config(ROOT / "configs" / name).diffusion.backbone == "masked"
    cfg = load_config(None, ["diffusion.backbone=masked", "finetune.alpha=0.01"])
    assert cfg.diffusion.backbone == "masked"
    for override, message in (
            ("diffusion.eta=0", "diffusion.eta: got 0.0, expected 1.0 with diffusion.backbone=masked"),
            ("diffusion.clip_x0=true", "diffusion.clip_x0: got True"),
            ("diffusion.data_noise=0.1", "diffusion.data_noise: got 0.1"),
            ("diffusion.backbone=simplex", "diffusion.backbone: got 'simplex', expected 'gaussian_onehot' | 'masked'")):
        with pytest.raises(ConfigError, match=None) as err:
            load_config(None, ["diffusion.backbone=masked", override])
        assert message in str(err.value)


def test_the_pipeline_runs_every_method_on_the_masked_backbone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    methods = sorted(METHODS)
    pipeline.run(tiny_config("diffusion.backbone=masked", f"run.dir={run}", f"finetune.methods=[{','.join(methods)}]"))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rows = {label(m) for m in methods} | {"Pretrained"}
    assert rows <= set(metrics["methods"]) and "unavailable" not in metrics["elbo"]
    for name in rows:
        for key in ("median", "mean", "valid_share", "elbo", "diversity"):
            assert math.isfinite(metrics["methods"][name][key]), (name, key)
    report = (run / "eval" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in rows)
    assert "ELBO: the variational lower bound of the masked T-step sampler" in report and "DDPM" not in report
    for m in methods:
        summary = json.loads((run / "finetune" / m / "summary.json").read_text())
        assert math.isfinite(summary["kl"]) and summary["final"]["onehot_distance"] == 0
    samples = pd.read_parquet(run / "eval" / "samples.parquet")
    assert set(samples["sequence"].str.len()) == {5}

"""The conservative reward: penalty maths, bonus closed form, gradients, checkpoints, member independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braid_ray.config import load_config
from braid_ray.data.encoding import one_hot
from braid_ray.reward.conservative import ConservativeReward, RewardStats, bonus, bonus_factor
from braid_ray.reward.fit import assemble, reward_data, stack_spec, train_spec
from braid_ray.reward.stacked import StackedNet, StackSpec
from braid_ray.reward.train import train_members


def _synthetic(n: int = 600, length: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (n, length)).astype(np.int8)
    return codes, (codes == 1).sum(1) + 0.5 * (codes[:, 0] == 3) + rng.normal(0, 0.2, n)


def _cfg(*extra: str):
    return load_config(None, ["reward.members=4", "reward.channels=8", "reward.hidden=16", "reward.epochs=3",
                              "reward.batch_size=64", *extra])


@pytest.fixture(scope="module")
def fitted() -> tuple[ConservativeReward, np.ndarray]:
    codes, y = _synthetic()
    cfg = _cfg()
    rd = reward_data(codes, y, 0.1, seed=0)
    net, _ = train_members(rd.codes, rd.z, list(range(4)), stack_spec(cfg.reward, 10), train_spec(cfg.reward), 0,
                           progress=False)
    return assemble(net, rd, cfg.reward), rd.codes


def test_bonus_equals_the_kernel_ridge_posterior_variance() -> None:
    """lambda phi^T (Phi^T Phi + lambda I)^-1 phi == k(x,x) - k_x^T (K + lambda I)^-1 k_x for k = phi^T phi'."""
    g = torch.Generator().manual_seed(0)
    phi_train = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    phi_test = torch.randn(3, 9, 6, generator=g, dtype=torch.float64) * 2
    lam = 0.7
    ours = bonus(phi_test, bonus_factor(phi_train, lam), lam) ** 2
    for m in range(3):
        big_k = phi_train[m] @ phi_train[m].T
        k_x = phi_train[m] @ phi_test[m].T  # (n, B)
        post = (phi_test[m] ** 2).sum(1) - (k_x * torch.linalg.solve(big_k + lam * torch.eye(40, dtype=torch.float64),
                                                                     k_x)).sum(0)
        torch.testing.assert_close(ours[m], post, atol=1e-5, rtol=1e-5)


def test_penalty_modes_follow_their_definitions(fitted) -> None:
    reward, codes = fitted
    x = torch.from_numpy(one_hot(codes[:50]))
    r, phi = reward.members(x)
    r_hat, g_none = reward(x, "none")
    torch.testing.assert_close(r_hat, r.mean(0))
    assert (g_none == 0).all()
    r_hat, g_min = reward(x, "min")
    torch.testing.assert_close(r_hat - g_min, r.min(0).values)
    assert (g_min >= 0).all()
    strong = reward.with_penalty("lcb", strength=2.0)
    _, g_lcb = strong(x)
    torch.testing.assert_close(g_lcb, 2.0 * reward.stats.lcb_scale * r.std(0))
    _, g_bonus = reward(x, "bonus")
    torch.testing.assert_close(g_bonus, reward.stats.bonus_scale
                               * bonus(phi, reward.chol, reward.stats.bonus_lambda).mean(0))
    with pytest.raises(ValueError, match="unknown penalty 'max'"):
        reward.with_penalty("max")


def test_penalty_scale_makes_strength_one_match_the_reward_spread(fitted) -> None:
    reward, codes = fitted
    x = torch.from_numpy(one_hot(codes))
    with torch.no_grad():
        r_hat, g_lcb = reward(x, "lcb")
        _, g_bonus = reward(x, "bonus")
    assert g_lcb.std().item() == pytest.approx(r_hat.std().item(), rel=1e-3)
    assert g_bonus.std().item() == pytest.approx(r_hat.std().item(), rel=1e-3)


def test_identical_members_have_zero_spread() -> None:
    spec = StackSpec(length=10, channels=8, hidden=16, spectral_norm=False)
    one = StackedNet(spec, [0], seed=0).member_state(0)
    net = StackedNet.from_members(spec, [0, 1, 2], [one, one, one])
    d = 16
    reward = ConservativeReward(net, RewardStats(0.0, 1.0, 1.0, 1.0, 1.0), torch.zeros(3, d),
                                torch.eye(d).expand(3, d, d).clone(), torch.eye(d).expand(3, d, d).clone())
    x = torch.from_numpy(one_hot(_synthetic(20)[0]))
    for penalty in ("min", "lcb"):
        _, g = reward(x, penalty)
        torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-6, rtol=0)


@pytest.mark.parametrize("penalty", ["none", "min", "lcb", "bonus"])
def test_gradients_reach_soft_inputs_through_r_hat_minus_g_hat(fitted, penalty: str) -> None:
    reward, codes = fitted
    logits = torch.randn(8, 10, 4, requires_grad=True)
    r_hat, g_hat = reward(torch.softmax(logits, -1), penalty)
    (r_hat - g_hat).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())  # the reward's weights are frozen


def test_checkpoint_round_trip(fitted) -> None:
    reward, codes = fitted
    restored = ConservativeReward.from_bytes(reward.to_bytes({"note": "x"}), penalty="bonus", strength=1.5)
    x = torch.from_numpy(one_hot(codes[:40]))
    for penalty in ("none", "min", "lcb", "bonus"):
        a = reward.with_penalty(penalty, 1.5)(x)
        b = restored(x, penalty)
        torch.testing.assert_close(a, b)
    assert restored.stats == reward.stats and restored.net.members == [0, 1, 2, 3]


@pytest.mark.parametrize("diverse, spectral", [(False, True), (True, False)])
def test_member_weights_do_not_depend_on_how_members_are_grouped(diverse: bool, spectral: bool) -> None:
    """The same member trained alone, in a stack of 4, or on another 'worker' ends with the same weights."""
    codes, y = _synthetic(300)
    z = (y - y.mean()) / y.std()
    spec = StackSpec(length=10, channels=8, hidden=16, diverse=diverse, spectral_norm=spectral)
    train = train_spec(_cfg("reward.epochs=4", "reward.patience=1").reward)
    together, metrics_all = train_members(codes, z, [0, 1, 2, 3], spec, train, seed=5, progress=False)
    halves = [train_members(codes, z, ids, spec, train, seed=5, progress=False) for ids in ([0, 1], [2, 3])]
    for i in range(4):
        alone = halves[i // 2][0].member_state(i % 2)
        for key, value in together.member_state(i).items():
            torch.testing.assert_close(alone[key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert [m["best_epoch"] for m in metrics_all] == [m["best_epoch"] for h in halves for m in h[1]]
    # Different members differ: each has its own resample and initial weights.
    assert not torch.allclose(together.member_state(0)["dense_w.0"], together.member_state(1)["dense_w.0"])


def test_diverse_members_mix_kernel_widths_and_activations() -> None:
    from braid_ray.reward.stacked import member_architecture

    spec = StackSpec(length=10, kernel_size=5, diverse=True)
    archs = {member_architecture(spec, m) for m in range(12)}
    assert {w for w, _ in archs} == {1, 3, 5} and len({a for _, a in archs}) == 4
    assert member_architecture(StackSpec(length=10, kernel_size=5), 7) == (5, 0)

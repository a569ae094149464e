"""benchmarks/relaxation_gap.py: r_hat on the relaxed x0 the reward sees in training against r_hat on the design."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from braid_ray import pipeline
from braid_ray.diffusion.sampler import FineTunedPolicy
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("relaxation_gap", ROOT / "benchmarks" / "relaxation_gap.py")
rg = importlib.util.module_from_spec(_spec)
sys.modules["relaxation_gap"] = rg
_spec.loader.exec_module(rg)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gap") / "run"
    pipeline.run(tiny_config(f"run.dir={path}"))
    return path


def test_rows_score_the_relaxed_input_and_the_decoded_design(run: Path) -> None:
    rows = rg.run_dir_rows(run, n=24)
    assert [r["method"] for r in rows] == ["Pretrained", "strl", "braid_bonus"]
    for r in rows:
        assert r["relaxation_gap"] == pytest.approx(r["r_hat_relaxed"] - r["r_hat_decoded"], abs=1e-5)
        assert 0.25 <= r["max_prob"] <= 1.0 and np.isfinite(r["oracle_median"]) and r["n"] == 24
        assert r["kl_last_pred_reward"] > 0 and r["kl_last_pred_bonus"] > 0
    assert rows[0]["kl_last"] == pytest.approx(0.0, abs=1e-9)  # the pretrained policy pays no KL
    assert rows[1]["kl_last"] > 0  # STRL's correction acts on the last step
    assert "| strl |" in rg.table(rows)


def test_the_gap_vanishes_when_the_relaxation_is_one_hot(run: Path) -> None:
    _, _, oracle, backbone, pretrained, reward = rg.load_run(run)
    backbone.temperature = 1e-4  # softmax(x0 / temperature) is the hard one-hot of argmax x0
    row = rg.gap(FineTunedPolicy(backbone, pretrained, "shift"), reward, oracle, 16, 8, seed=0, alpha=1e-3)
    assert row["max_prob"] == pytest.approx(1.0, abs=1e-4)
    assert row["relaxation_gap"] == pytest.approx(0.0, abs=1e-4)
    assert row["bonus_relaxed"] == pytest.approx(row["bonus_decoded"], abs=1e-4)
    backbone.temperature = 1e3  # a near-uniform relaxation is another input: the reward differs
    soft = rg.gap(FineTunedPolicy(backbone, pretrained, "shift"), reward, oracle, 16, 8, seed=0, alpha=1e-3)
    assert abs(soft["relaxation_gap"]) > 1e-6 and soft["max_prob"] < 0.5  # a one-epoch reward is nearly flat
    # the designs are the same samples either way: the temperature only changes what the reward sees
    assert soft["oracle_median"] == row["oracle_median"] and soft["r_hat_decoded"] == pytest.approx(row["r_hat_decoded"])


@pytest.mark.parametrize("penalty", ["none", "bonus"])
def test_the_predicted_last_step_kl_is_the_optimum_of_a_small_shift(run: Path, penalty: str) -> None:
    """Maximise E[R(x0 + delta)] - alpha |delta|^2 / (2 sigma_1^2) over a free shift delta per sample, on the run's
    own reward (not linearised): at an alpha where delta is small its KL is the closed form's."""
    _, _, _, backbone, pretrained, reward = rg.load_run(run)
    # points where the relaxation is not saturated (the tiny model's own samples sit where dR/dx0 is ~0)
    x0 = 0.5 * torch.randn(8, backbone.length, 4, generator=torch.Generator().manual_seed(3))
    sigma = backbone.schedule.sigma(1)
    grad_sq = rg.objective_grad_sq(reward, backbone, x0, penalty)
    alpha = float(sigma**2 * grad_sq.max().sqrt() / 1e-3)  # the optimal |delta| = sigma^2 |dR/dx0| / alpha <= 1e-3

    def objective(x: torch.Tensor) -> torch.Tensor:
        r_hat, g_hat = reward(backbone.reward_input(x), penalty)
        return (r_hat - g_hat) / reward.stats.y_std

    delta = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.LBFGS([delta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -(objective(x0 + delta).sum() - alpha * delta.pow(2).sum() / (2 * sigma**2))
        loss.backward()
        return loss

    opt.step(closure)
    kl = float(delta.detach().pow(2).sum(dim=(1, 2)).mean() / (2 * sigma**2))
    predicted = rg.predicted_last_step_kl(grad_sq, sigma, alpha)
    assert kl > 0 and kl == pytest.approx(predicted, rel=0.02)
    assert rg.predicted_last_step_kl(grad_sq, sigma, 2 * alpha) == pytest.approx(predicted / 4)


def test_the_step_sensitivity_of_the_last_step_is_the_last_step_prediction(run: Path) -> None:
    """shift_sensitivity's own pretrained chain, at j = 1, is gap()'s rollout of the pretrained policy (the same
    generator draws the same trajectories): the two code paths give the same closed-form KL."""
    _, _, oracle, backbone, pretrained, reward = rg.load_run(run)
    row = rg.gap(FineTunedPolicy(backbone, pretrained, "shift"), reward, oracle, 16, 16, seed=5, alpha=1e-3)
    steps = rg.shift_sensitivity(backbone, pretrained, reward, [1, 2, backbone.steps], 16, seed=5, alpha=1e-3)
    assert [s["step"] for s in steps] == [1, 2, backbone.steps]
    assert steps[0]["kl_mean"] == pytest.approx(row["kl_last_pred_reward"], rel=1e-4)
    bonus = rg.shift_sensitivity(backbone, pretrained, reward, [1], 16, seed=5, alpha=1e-3, penalty="bonus")
    assert bonus[0]["kl_mean"] == pytest.approx(row["kl_last_pred_bonus"], rel=1e-4)
    for s in steps:
        assert 0 <= s["kl_median"] <= s["kl_p99"] and np.isfinite(s["kl_mean"]) and s["sigma"] > 0


def test_the_step_sensitivity_carries_the_gradient_back_through_the_pretrained_steps(run: Path) -> None:
    """At j = 3 the closed form's KL equals the one built from a central finite-difference gradient of R(x0) with
    respect to x_2, the pretrained steps 2 and 1 re-run with their noise held fixed (in float64)."""
    _, _, _, backbone, pretrained, reward = rg.load_run(run)
    pretrained, reward = pretrained.double(), reward.double()
    backbone.temperature = 5.0  # a relaxation that is not saturated, so the gradient is not ~0
    n, j, alpha, seed = 4, 3, 1e-3, 11
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the chain's prior and noise
    try:
        states, noise = rg.pretrained_chain(backbone, pretrained, n, seed)
        with torch.no_grad():
            mean, sigma = backbone.policy(pretrained, states[j], j)
            x_prev = mean + sigma * noise[j]
            torch.testing.assert_close(x_prev, states[j - 1])  # the trajectory's own x_{j-1} ...
            torch.testing.assert_close(rg.carry(backbone, pretrained, x_prev, j, noise),  # ... and its own x0
                                       rg.carry(backbone, pretrained, states[1], 2, noise))

            def objective(x: torch.Tensor) -> torch.Tensor:
                r_hat, g_hat = reward(backbone.reward_input(rg.carry(backbone, pretrained, x, j, noise)), "none")
                return (r_hat - g_hat) / reward.stats.y_std

            h, grad = 1e-6, torch.zeros_like(x_prev)
            for idx in np.ndindex(*x_prev.shape[1:]):
                e = torch.zeros_like(x_prev)
                e[(slice(None), *idx)] = h
                grad[(slice(None), *idx)] = (objective(x_prev + e) - objective(x_prev - e)) / (2 * h)
        expected = float((sigma**2 * grad.pow(2).sum(dim=(1, 2)) / (2 * alpha**2)).mean())
        row = rg.shift_sensitivity(backbone, pretrained, reward, [j], n, seed, alpha)[0]
    finally:
        torch.set_default_dtype(default)
    assert expected > 0 and row["kl_mean"] == pytest.approx(expected, rel=1e-4)

"""The steering baselines (DDOM, Offline Guidance, CFG): the guidance's closed forms on one-step models, a
conditional model that follows its label, the oracle reaching them only through the counted selection, and their
rows in a tiny pipeline on both backbones, whose re-run reuses the trained conditional models."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from braid_ray import pipeline
from braid_ray.baselines.conditional import (CFGDenoiser, conditional_denoiser, ddom_weights, train_conditional,
                                             training_rows)
from braid_ray.baselines.guidance import designs, reward_gradient, sample
from braid_ray.baselines.rows import SAMPLERS, Context, baseline_rows
from braid_ray.config import ConfigError, DiffusionConfig, load_config
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.masked import MaskedDiffusion
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.evaluate import SELECTION_QUERIES, baseline_queries, sample_codes, selection_seed
from braid_ray.finetune.run import load_pretrained, load_reward
from braid_ray.methods import BASELINES, METHODS
from tests.tiny import LENGTH, tiny_config

LABELS = [b.label for b in BASELINES.values()]
# Small grids, so the tiny runs spend little time choosing settings.
GRIDS = ("baselines.methods=[ddom,guidance,cfg]", "baselines.condition_quantiles=[1.0]", "baselines.cfg_weights=[0,2]",
         "baselines.guidance_scales=[1,10]")


class Fixed(nn.Module):
    """A denoiser that predicts the same output (L, 4) for every x_t and t."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out.expand(x.shape[0], -1, -1)


# ---- the guidance's closed forms


def test_guidance_with_a_linear_reward_moves_a_one_step_gaussian_by_scale_sigma2_w() -> None:
    """One step (T = 1, eta = 1): the mean is the predicted x0 and sigma_1^2 = beta_1, so guidance by r = w . x0 at
    scale s moves every sample, with the same noise, by exactly s sigma_1^2 w (and the mean over samples too)."""
    backbone = GaussianOneHotDiffusion(length=3, steps=1, eta=1.0)
    model = Fixed(torch.zeros(3, 4))
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    scale, sigma2 = 2.5, float(backbone.schedule.sigma2[1])
    assert sigma2 > 0.5
    plain = sample(backbone, model, 4000, torch.Generator().manual_seed(1))
    guided = sample(backbone, model, 4000, torch.Generator().manual_seed(1), lambda x0: (x0 * w).sum((1, 2)), scale)
    torch.testing.assert_close(guided - plain, (scale * sigma2 * w).expand(4000, -1, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided.mean(0) - plain.mean(0), scale * sigma2 * w)
    assert ((guided.mean(0) - plain.mean(0)) * w).sum() > 0  # towards the reward's direction


def test_discrete_guidance_tilts_a_one_step_categorical_by_exp_scale_w() -> None:
    """One masked step (T = 1): every position unmasks to letter j with p_pre(j). With a reward linear in the one-hot,
    r = w . onehot, the first-order guidance is exact: p(j) is proportional to p_pre(j) exp(s w_j), per position."""
    backbone = MaskedDiffusion(length=2, steps=1)
    logits = torch.tensor([[0.5, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    w = torch.tensor([[1.0, 0.0, -0.5, 0.2], [0.0, 2.0, 0.0, -1.0]])
    scale = 1.5

    def linear(x0: torch.Tensor) -> torch.Tensor:
        return (w * (x0 + 1) / 2).sum((1, 2))  # w . one-hot

    x_t = backbone.prior(1)
    params, x0_hat = backbone.prediction(Fixed(logits), x_t, 1)
    guided = backbone.guide(params, reward_gradient(linear, x0_hat), scale)
    expected = torch.softmax(logits, -1) * torch.exp(scale * w)
    torch.testing.assert_close(torch.softmax(guided[0], -1), expected / expected.sum(-1, keepdim=True))
    # ... and the sampler draws from it: letter frequencies of 20,000 one-step samples
    x0 = sample(backbone, Fixed(logits), 20_000, torch.Generator().manual_seed(0), linear, scale)
    freq = torch.nn.functional.one_hot(backbone.decode(x0), 4).float().mean(0)
    torch.testing.assert_close(freq, expected / expected.sum(-1, keepdim=True), atol=0.015, rtol=0)


@pytest.mark.parametrize("backbone_name", ["gaussian_onehot", "masked"])
def test_guidance_at_scale_zero_is_the_pretrained_sampler(backbone_name: str) -> None:
    """The baselines' sampler draws its noise as the evaluation's rollout does: at scale 0 it gives the Pretrained
    row's designs exactly, so a guided row differs from Pretrained by the guidance alone."""
    cfg = DiffusionConfig(backbone=backbone_name, steps=4, channels=8, blocks=1, emb_dim=8)
    backbone, model = build_backbone(cfg, 6), build_denoiser(cfg, 6, seed=0).eval()
    expected, _ = sample_codes(FineTunedPolicy(backbone, model, "shift"), 48, 16, seed=3)
    got, _ = designs(backbone, model, 48, 16, seed=3, reward_fn=lambda x0: x0.sum((1, 2)), scale=0.0)
    np.testing.assert_array_equal(got, expected)


# ---- DDOM / CFG: the conditional model


@pytest.mark.parametrize("backbone_name", ["gaussian_onehot", "masked"])
def test_conditional_model_samples_higher_y_at_higher_guidance(backbone_name: str) -> None:
    """A task whose answer is known: y = the share of letter A in a 4-mer (best: AAAA). DDOM's conditional model,
    asked for y = 1, draws more A than unconditionally (about a quarter), and more still as the CFG weight grows."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(2048, 4)).astype(np.int8)
    y = (codes == 0).mean(1) + 0.01 * rng.standard_normal(len(codes))
    cfg = DiffusionConfig(backbone=backbone_name, steps=10, channels=16, blocks=1, emb_dim=16, batch_size=128, lr=3e-3)
    backbone = build_backbone(cfg, 4)
    rows, labels, mean, std = training_rows("d_off", codes, y, np.arange(len(codes)))
    model = conditional_denoiser(cfg, 4, backbone.in_channels, seed=0)
    losses = train_conditional(model, backbone, rows, labels, cfg, epochs=15, label_dropout=0.2, seed=0)
    assert losses[-1] < losses[0]
    model.eval()
    share = {}
    for w in (None, 0.0, 1.0, 3.0):  # None: no label
        guided = CFGDenoiser(model, math.nan, 0.0) if w is None else CFGDenoiser(model, (1.0 - mean) / std, w)
        sampled, _ = designs(backbone, guided, 512, 512, seed=1)
        share[w] = float((sampled == 0).mean())
    assert share[None] < 0.35 and share[0.0] > share[None] + 0.2, share
    assert share[3.0] > share[1.0] > share[0.0], share
    assert share[3.0] > 0.8, share


def test_training_rows_read_no_label_outside_d_off() -> None:
    codes = np.arange(20, dtype=np.int8).reshape(10, 2) % 4
    y = np.arange(10, dtype=float)
    off = np.array([1, 3, 4])
    ddom_codes, ddom_labels, mean, std = training_rows("d_off", codes, y, off)
    np.testing.assert_array_equal(ddom_codes, codes[off])
    np.testing.assert_allclose(ddom_labels * std + mean, y[off])
    cfg_codes, cfg_labels, *_ = training_rows("d", codes, y, off)
    np.testing.assert_array_equal(cfg_codes, codes)  # every sequence, as pretraining sees them ...
    assert np.isfinite(cfg_labels).sum() == 3  # ... labelled in D_off only
    assert np.isnan(np.delete(cfg_labels, off)).all()


def test_ddom_reweighting_draws_high_y_rows_more() -> None:
    y = np.random.default_rng(0).normal(size=5000)
    p = ddom_weights(y)
    assert p.shape == y.shape and np.isclose(p.sum(), 1) and (p >= 0).all()
    assert (p * y).sum() > np.quantile(y, 0.75)  # the weighted mean of y is far above the plain mean (about 0)
    order = np.argsort(y)
    # above the median a row's weight grows with its y (bin by bin; below it, rare bins' rows weigh more per row)
    assert p[order[-1]] > p[order[-300]] > p[order[4000]] > p[order[2500]]


def test_a_conditional_model_without_a_label_embedding_refuses_a_label() -> None:
    model = build_denoiser(DiffusionConfig(channels=8, blocks=1, emb_dim=8), 5, seed=0)
    x, t = torch.zeros(2, 5, 4), torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="no label embedding"):
        model(x, t, torch.zeros(2))
    assert not any("label" in name for name, _ in model.named_parameters())  # unconditional checkpoints unchanged


# ---- configuration


@pytest.mark.parametrize("overrides, message", [
    (["baselines.methods=[dom]"], "baselines.methods: got 'dom', expected names from ['cfg', 'ddom', 'guidance']"),
    (["baselines.methods=[ddom,ddom]"], "each name at most once"),
    (["baselines.methods=[guidance]", "diffusion.eta=0", "finetune.alpha=0"], "no guidance with diffusion.eta=0"),
    (["baselines.methods=[ddom]", "domain=image"], "[] with domain: image"),
    (["baselines.cfg_weights=[]"], "baselines.cfg_weights: got [], expected a non-empty list"),
    (["baselines.condition_quantiles=[0.95, 1.2]"], "quantiles in (0, 1]"),
    (["baselines.label_dropout=0"], "baselines.label_dropout: got 0.0"),
    (["baselines.guidance_penalty=max"], "baselines.guidance_penalty: got 'max'"),
])
def test_config_refuses_baselines_that_make_no_sense(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_deterministic_masked_guidance_is_allowed_and_baselines_are_off_by_default() -> None:
    assert load_config().baselines.methods == []
    cfg = load_config(None, ["diffusion.backbone=masked", "baselines.methods=[ddom,guidance,cfg]"])
    assert baseline_queries(cfg) == SELECTION_QUERIES * (2 * 4 + 4 + 2 * 4)


# ---- the pipeline: rows, the oracle budget, reuse


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("baselines") / "run"
    cfg = tiny_config(f"run.dir={run}", *GRIDS)
    pipeline.run(cfg)
    return run, cfg


def _check_rows(run: Path, cfg) -> dict:
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for name in LABELS:
        for key in ("median", "mean", "valid_share", "diversity", "selection_score"):
            assert math.isfinite(metrics["methods"][name][key]), (name, key)
    assert sum(m["queries"] for m in metrics["baselines"].values()) == baseline_queries(cfg) == 64 * (2 + 2 + 2)
    report = (run / "eval" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in LABELS) and "oracle queries on designs apart" in report
    samples = pd.read_parquet(run / "eval" / "samples.parquet")
    assert set(LABELS) <= set(samples["method"]) and (samples["method"] == "DDOM").sum() == cfg.eval.n_samples
    return metrics


def test_the_pipeline_reports_every_baseline_on_the_gaussian_backbone(gaussian_run) -> None:
    run, cfg = gaussian_run
    metrics = _check_rows(run, cfg)
    assert metrics["baselines"]["DDOM"]["rows"] == 512 and metrics["baselines"]["CFG"]["labelled"] == 512
    assert metrics["baselines"]["CFG"]["rows"] == 1024  # every sequence of D, as the pretrained model saw
    assert (run / "baselines" / "ddom" / "denoiser.safetensors").is_file() and (run / "eval" / "scores.png").is_file()


def test_a_rerun_reuses_the_trained_conditional_models(gaussian_run, caplog: pytest.LogCaptureFixture) -> None:
    run, _ = gaussian_run
    before = (run / "baselines" / "cfg" / "denoiser.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="braid_ray"):
        pipeline.run(tiny_config(f"run.dir={run}", *GRIDS, "baselines.guidance_scales=[3]", "run.overwrite=true"))
    reused = {r.getMessage().split(": reusing")[0] for r in caplog.records if ": reusing " in r.getMessage()}
    assert {"baselines/ddom", "baselines/cfg", "pretrain", "reward"} <= reused and "eval" not in reused
    assert (run / "baselines" / "cfg" / "denoiser.safetensors").stat().st_mtime_ns == before
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["baselines"]["Offline Guidance"]["chosen"] == {"guidance_scale": 3.0}


class PoisonedOracle:
    """Counts every design it scores; any other use (its info, a secondary oracle, ...) fails the test. Its scores
    rise with each call (``prefer="last"``) or fall (``"first"``), so it decides which setting wins."""

    def __init__(self, prefer: str):
        self.prefer, self.calls = prefer, []

    def score(self, codes: np.ndarray) -> np.ndarray:
        self.calls.append(np.array(codes))
        return np.full(len(codes), float(len(self.calls) if self.prefer == "last" else -len(self.calls)))

    def __getattr__(self, name: str):
        raise AssertionError(f"a baseline read oracle.{name}")


def test_the_oracle_reaches_a_baseline_only_through_the_counted_selection(gaussian_run) -> None:
    """The samplers are built from the run's stages and D_off's labels alone; the oracle only scores SELECTION_QUERIES
    selection designs per setting (drawn on their own stream), which decides the setting; the evaluated designs are
    then the chosen setting's draw at the evaluation's seed, whatever the oracle said."""
    run, cfg = gaussian_run
    backbone = build_backbone(cfg.diffusion, LENGTH, cfg.finetune.temperature, cfg.finetune.straight_through)
    off_y = pd.read_parquet(run / "data" / "d_off.parquet")["y"].to_numpy()
    ctx = Context(cfg, str(run), backbone, load_pretrained(cfg, str(run), LENGTH), load_reward(str(run), "none", 1.0),
                  off_y)
    seed, other = cfg.run.seed, selection_seed(cfg.run.seed)
    for prefer in ("first", "last"):
        oracle = PoisonedOracle(prefer)
        rows = baseline_rows(ctx, lambda c: float(oracle.score(c).mean()), SELECTION_QUERIES, seed, other)
        assert len(oracle.calls) * SELECTION_QUERIES == baseline_queries(cfg)
        assert all(len(c) == SELECTION_QUERIES for c in oracle.calls)
        for name in cfg.baselines.methods:
            label = BASELINES[name].label
            sampler = SAMPLERS[BASELINES[name].kind](ctx, name)
            setting = sampler.grid[0 if prefer == "first" else -1]
            assert rows[label].choice.setting == setting
            np.testing.assert_array_equal(rows[label].codes, sampler.draw(setting, cfg.eval.n_samples, seed)[0])
            selection, _ = sampler.draw(setting, SELECTION_QUERIES, other)
            assert not np.array_equal(selection, rows[label].codes[:SELECTION_QUERIES])


def test_the_pipeline_reports_every_baseline_on_the_masked_backbone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config("diffusion.backbone=masked", f"run.dir={run}", *GRIDS, "baselines.guidance_penalty=min")
    pipeline.run(cfg)
    metrics = _check_rows(run, cfg)
    assert metrics["baselines"]["Offline Guidance"]["penalty"] == "min"
    labels = json.loads((run / "baselines" / "ddom" / "labels.json").read_text())
    assert labels["data"] == "d_off" and all(math.isfinite(x) for x in labels["epoch_loss"])


def test_the_baselines_stage_trains_the_conditional_models_and_an_evaluation_needs_no_fine_tuning(
        tmp_path: Path) -> None:
    """Stage "baselines" trains DDOM's and CFG's models with the upstream stages (as benchmarks/quality.py runs them,
    once per seed); an evaluation with no fine-tuned method still reports Pretrained and every baseline."""
    run = tmp_path / "run"
    cfg = tiny_config(f"run.dir={run}", *GRIDS, "finetune.methods=[]")
    pipeline.run(cfg, stages=pipeline.UPSTREAM + ("baselines",))
    assert {p.name for p in (run / "baselines").iterdir()} == {"ddom", "cfg"} and not (run / "finetune").exists()
    assert not (run / "eval").exists()
    pipeline.run(cfg)
    metrics = _check_rows(run, cfg)
    assert {"Pretrained", *LABELS} <= set(metrics["methods"])
    assert not set(metrics["methods"]) & {m.label for m in METHODS.values()}  # nothing fine-tuned

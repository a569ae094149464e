"""The steering baselines as rows of the evaluation (``baselines.methods``): each one's sampler over its grid of
settings, and the choice of a setting with an explicit oracle budget, as alpha is chosen.

A baseline's sampler is built from the run directory's stages (the pretrained model, the reward ensemble, the
conditional models of ``baselines/<name>``) and never sees the oracle. The oracle reaches a baseline only through
``choose``'s ``select`` function: ``queries`` designs per setting, drawn on the selection stream (apart from the
evaluated designs), scored by ``select`` (the evaluation's selection score: their mean oracle score, each design the
validity rule rejects counted as the worst offline design); the best setting is then sampled at the evaluation's seed and scored like
every row. The budget spent is ``queries`` times the number of settings, and the report says so.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from safetensors.torch import load as load_safetensors
from torch import nn

from braid_ray.baselines.conditional import CFGDenoiser, conditional_denoiser
from braid_ray.baselines.guidance import designs, guiding_reward
from braid_ray.config import Config
from braid_ray.diffusion.pretrain import Backbone
from braid_ray.methods import BASELINES
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.rundir import RunDir

Setting = dict[str, float]
Draw = Callable[[Setting, int, int], tuple[np.ndarray, np.ndarray]]  # (setting, n, seed) -> (codes, onehot distance)


@dataclass
class Sampler:
    """A baseline's designs as a function of its setting, and the grid of settings to choose from."""

    grid: list[Setting]  # the settings the selection budget chooses from
    draw: Draw
    info: dict = field(default_factory=dict)  # what the report and metrics.json say of it


@dataclass
class Choice:
    """The setting the selection budget chose, with what it cost."""

    setting: Setting
    score: float  # its selection_score
    trials: list[dict]  # every setting with its selection_score
    queries: int  # oracle queries spent


def choose(sampler: Sampler, select: Callable[[np.ndarray], float], queries: int, seed: int) -> Choice:
    """The setting of ``sampler.grid`` whose ``queries`` designs (drawn with ``seed``, the selection stream) have the
    best ``select`` score (the first best on ties; a non-finite score never wins over a finite one)."""
    trials = []
    for setting in sampler.grid:
        codes, _ = sampler.draw(setting, queries, seed)
        trials.append({**setting, "selection_score": float(select(codes))})
    scores = [t["selection_score"] if math.isfinite(t["selection_score"]) else -math.inf for t in trials]
    best = int(np.argmax(scores))
    return Choice(dict(sampler.grid[best]), trials[best]["selection_score"], trials, queries * len(trials))


@dataclass
class Context:
    """What a baseline's sampler is built from: the run's stages and D_off's labels, never the oracle."""

    cfg: Config
    run_uri: str
    backbone: Backbone
    pretrained: nn.Module  # the pretrained denoiser (frozen)
    reward: ConservativeReward  # the ensemble trained on D_off
    off_y: np.ndarray  # D_off's measured y (N_off,): what the condition quantiles are quantiles of


def grid(cfg: Config, kind: str) -> list[Setting]:
    """The settings a baseline of ``kind`` chooses from: condition quantile x CFG weight, or the guidance scales."""
    b = cfg.baselines
    if kind == "conditional":
        return [{"condition_quantile": q, "cfg_weight": w}
                for q, w in itertools.product(b.condition_quantiles, b.cfg_weights)]
    return [{"guidance_scale": s} for s in b.guidance_scales]


def conditional_sampler(ctx: Context, name: str) -> Sampler:
    """DDOM / CFG: the conditional model of stage ``baselines/<name>`` with classifier-free guidance, over the grid
    condition quantile x CFG weight; the target is that quantile of y over D_off, standardised as in training."""
    cfg, backbone = ctx.cfg, ctx.backbone
    stage = RunDir(ctx.run_uri).stage(f"baselines/{name}")
    labels = stage.read_json("labels.json")
    model = conditional_denoiser(cfg.diffusion, backbone.length, backbone.in_channels, seed=0)
    model.load_state_dict(stage.load("denoiser.safetensors", load_safetensors))
    model.eval()
    targets = {q: float(np.quantile(ctx.off_y, q)) for q in cfg.baselines.condition_quantiles}

    def draw(setting: Setting, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        z = (targets[setting["condition_quantile"]] - labels["mean"]) / labels["std"]
        return designs(backbone, CFGDenoiser(model, z, setting["cfg_weight"]), n, cfg.eval.batch_size, seed)

    info = {"trained_on": BASELINES[name].data, **{k: labels[k] for k in ("rows", "labelled", "reweight")},
            "condition_y": {f"{q:g}": y for q, y in targets.items()}}
    return Sampler(grid(cfg, "conditional"), draw, info)


def guidance_sampler(ctx: Context, name: str) -> Sampler:
    """Offline Guidance: the pretrained model guided by r_z = (r_hat - g_hat) / std_y, over the guidance scales."""
    cfg, penalty = ctx.cfg, ctx.cfg.baselines.guidance_penalty
    reward_fn = guiding_reward(ctx.reward.with_penalty(penalty), ctx.backbone)

    def draw(setting: Setting, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return designs(ctx.backbone, ctx.pretrained, n, cfg.eval.batch_size, seed, reward_fn,
                       setting["guidance_scale"])

    return Sampler(grid(cfg, "guidance"), draw,
                   {"trained_on": BASELINES[name].data, "penalty": penalty})


# Baseline kind (braid_ray.methods.BASELINES) -> its sampler's factory
SAMPLERS: dict[str, Callable[[Context, str], Sampler]] = {"conditional": conditional_sampler,
                                                         "guidance": guidance_sampler}


@dataclass
class BaselineRow:
    codes: np.ndarray  # (n, L) the evaluated designs
    onehot_distance: np.ndarray  # (n,)
    choice: Choice
    info: dict


def baseline_rows(ctx: Context, select: Callable[[np.ndarray], float], queries: int, seed: int,
                  selection_seed: int) -> dict[str, BaselineRow]:
    """Every baseline of ``baselines.methods`` by its label: the setting chosen by ``select`` on ``queries`` designs
    per setting (noise seeded by ``selection_seed``), then ``eval.n_samples`` designs at ``seed``."""
    rows = {}
    for name in ctx.cfg.baselines.methods:
        baseline = BASELINES[name]
        sampler = SAMPLERS[baseline.kind](ctx, name)
        choice = choose(sampler, select, queries, selection_seed)
        codes, distance = sampler.draw(choice.setting, ctx.cfg.eval.n_samples, seed)
        rows[baseline.label] = BaselineRow(codes, distance, choice, sampler.info)
    return rows


def describe(label: str, row: BaselineRow) -> str:
    """One line of the report: what the baseline learnt from, the setting chosen and the oracle budget spent."""
    info, c = row.info, row.choice
    penalty = info.get("penalty", "none")
    guided_by = "r_hat" if penalty == "none" else f"r_hat - g_hat, penalty {penalty}"
    seen = {"d_off": f"trained from scratch on D_off ({info.get('rows', 0):,} rows and their labels)",
            "d": (f"a conditional pretraining on every sequence of D ({info.get('rows', 0):,} rows; labels of "
                  f"its {info.get('labelled', 0):,} D_off rows only)"),
            "reward": f"guidance on the pretrained model by the reward ensemble ({guided_by}); no fine-tuning"}[
        info["trained_on"]]
    chosen = ", ".join(f"{k} {v:g}" for k, v in c.setting.items())
    return (f"{label}: {seen}; chosen {chosen} (selection_score {c.score:.4g}) of {len(c.trials)} setting(s), "
            f"{c.queries:,} oracle queries on designs apart from the evaluated ones.")


def knob_json(row: BaselineRow) -> dict:
    """metrics.json's account of a baseline: what it learnt from, the setting chosen, the settings tried with
    their selection_score, and the oracle queries spent."""
    return {**row.info, "chosen": row.choice.setting, "selection_score": row.choice.score,
            "queries": row.choice.queries, "settings": row.choice.trials}

"""Fitting the conservative reward on D_off: rows, members, statistics, and the calibration report.

The members are trained elsewhere (in-process, or on Ray Train workers) by ``train_members``; this module
prepares their data and assembles them into one ConservativeReward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from braid_ray.config import RewardConfig
from braid_ray.data.encoding import one_hot
from braid_ray.eval.report import to_markdown
from braid_ray.eval.stats import pearson, spearman
from braid_ray.reward.conservative import PENALTIES, ConservativeReward, RewardStats, bonus, bonus_factor
from braid_ray.reward.stacked import MLPSpec, StackedNet, StackSpec
from braid_ray.reward.train import TrainSpec, member_inputs


def stack_spec(cfg: RewardConfig, length: int) -> StackSpec:
    return StackSpec(length, cfg.channels, cfg.layers, cfg.kernel_size, cfg.hidden, cfg.pool, cfg.diverse,
                     cfg.spectral_norm)


def mlp_spec(cfg: RewardConfig, dim: int) -> MLPSpec:
    """MLP members over D-dimensional vectors (image embeddings), from the same reward section."""
    return MLPSpec(dim, cfg.hidden, cfg.layers, cfg.spectral_norm)


def train_spec(cfg: RewardConfig) -> TrainSpec:
    return TrainSpec(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.patience)


@dataclass
class RewardData:
    """D_off split into the rows members train on and calibration rows no member sees."""

    codes: np.ndarray  # (n_train, L) sequence codes, or (n_train, D) vectors for MLP members
    z: np.ndarray  # standardised labels of the training rows
    y_mean: float
    y_std: float
    holdout: np.ndarray  # indices into D_off
    train: np.ndarray  # indices into D_off


def reward_data(codes_off: np.ndarray, y_off: np.ndarray, holdout_fraction: float, seed: int) -> RewardData:
    perm = np.random.default_rng([seed, 7]).permutation(len(codes_off))
    n_hold = max(1, int(round(holdout_fraction * len(codes_off))))
    holdout, train = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    y_mean, y_std = float(y_off[train].mean()), float(y_off[train].std() or 1.0)
    return RewardData(codes_off[train], (y_off[train] - y_mean) / y_std, y_mean, y_std, holdout, train)


def _whitening(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean (M, d) and W = (Cov + eps I)^{-1/2} (M, d, d) so (phi - mean) @ W has identity covariance."""
    mean = phi.mean(1)
    centred = phi - mean[:, None, :]
    cov = centred.transpose(1, 2) @ centred / phi.shape[1]
    evals, evecs = torch.linalg.eigh(cov)
    eps = 1e-3 * evals.mean(-1, keepdim=True).clamp(min=1e-12)
    w = evecs @ torch.diag_embed((evals.clamp(min=0) + eps).rsqrt()) @ evecs.transpose(1, 2)
    return mean, w


@torch.no_grad()
def assemble(net: StackedNet, data: RewardData, cfg: RewardConfig, chunk: int = 4096) -> ConservativeReward:
    """Whitening, the bonus Cholesky factor and the penalty scales, all from the members' training rows."""
    net = net.double().eval()
    x = member_inputs(net.spec, data.codes).double()
    phi = torch.cat([net.features(x[i:i + chunk]) for i in range(0, len(x), chunk)], dim=1)  # (M, n, d)
    m, d = phi.shape[0], phi.shape[2]
    if cfg.whiten:
        mean, w = _whitening(phi)
    else:
        mean, w = torch.zeros(m, d, dtype=phi.dtype), torch.eye(d, dtype=phi.dtype).expand(m, d, d).clone()
    phi_w = (phi - mean[:, None, :]) @ w
    chol = bonus_factor(phi_w, cfg.bonus_lambda)
    r = net.head(phi)  # (M, n), standardised units
    r_hat = r.mean(0)
    g_bonus = bonus(phi_w, chol, cfg.bonus_lambda).mean(0)
    spread = r.std(0) if m > 1 else torch.zeros_like(r_hat)
    stats = RewardStats(
        y_mean=data.y_mean, y_std=data.y_std, bonus_lambda=cfg.bonus_lambda,
        lcb_scale=float(r_hat.std() / spread.std()) if m > 1 and spread.std() > 0 else 0.0,  # spread is in y units
        bonus_scale=float(r_hat.std() / g_bonus.std()) * data.y_std if g_bonus.std() > 0 else 0.0)
    return ConservativeReward(net.float(), stats, mean.float(), w.float(), chol.float())


# ------------------------------------------------------------------------------------------------
# Calibration report


@torch.no_grad()
def score(reward: ConservativeReward, x: np.ndarray | torch.Tensor, penalty: str,
          chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(r_hat, g_hat) for codes (N, L) (integers), soft one-hot (N, L, 4) or vectors (N, D) under ``penalty``."""
    integer_codes = isinstance(x, np.ndarray) and x.ndim == 2 and np.issubdtype(x.dtype, np.integer)
    x = torch.from_numpy(one_hot(x)) if integer_codes else torch.as_tensor(x)
    outs = [reward(x[i:i + chunk].float(), penalty) for i in range(0, len(x), chunk)]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def calibration(reward: ConservativeReward, sets: dict[str, tuple[np.ndarray, np.ndarray]],
                relaxed: np.ndarray, seed: int) -> dict:
    """Per penalty mode: fit and penalty statistics on each labelled set, out/in ratios, and relaxed inputs.

    ``sets`` maps a name to (codes, y); it must contain ``in`` (held-out D_off rows) and may contain
    ``ood`` (D_0 outside D_off), ``top_half`` and ``top_1pct`` (of y over D_0).
    ``relaxed``: codes whose one-hot is mixed with random simplex points, as the generator's soft samples are.
    """
    rng = np.random.default_rng(seed)
    report: dict = {}
    for penalty in PENALTIES:
        rows: dict = {}
        for name, (codes, y) in sets.items():
            r, g = score(reward, codes, penalty)
            err = np.abs(r - y)
            rows[name] = {"rows": int(len(y)), "rmse": float(np.sqrt(np.mean((r - y) ** 2))),
                          "bias": float(np.mean(r - y)), "pearson": pearson(r, y, min_rows=3),
                          "spearman": spearman(r, y, min_rows=3),
                          "mean_r_hat": float(r.mean()), "mean_g_hat": float(g.mean()),
                          "coverage": float(np.mean(err <= g)), "spearman_g_abs_err": spearman(g, err, min_rows=3)}
        inside = rows["in"]["mean_g_hat"]
        rows["ratio_g_out_in"] = {k: (v["mean_g_hat"] / inside if inside > 0 else float("nan"))
                                  for k, v in rows.items() if k != "in"}
        both = [sets[k] for k in ("in", "ood") if k in sets]
        codes = np.concatenate([c for c, _ in both])
        y = np.concatenate([t for _, t in both])
        r, g = score(reward, codes, penalty)
        rows["spearman_g_abs_err"] = spearman(g, np.abs(r - y), min_rows=3)
        soft = {}
        hard = one_hot(relaxed)
        for t in (0.0, 0.25, 0.5, 1.0):
            noise = rng.dirichlet(np.ones(4), size=hard.shape[:2]).astype(np.float32)
            r, g = score(reward, (1 - t) * hard + t * noise, penalty)
            soft[f"t={t}"] = {"mean_r_hat": float(r.mean()), "mean_g_hat": float(g.mean())}
        rows["relaxed_inputs"] = soft
        report[penalty] = rows
    return report


def calibration_markdown(report: dict) -> str:
    """The calibration report as Markdown: a table with one row per penalty mode, then the reward on relaxed
    inputs per mode (``-``: a set the report does not have)."""
    fit = pd.DataFrame([{
        "penalty": penalty, "RMSE in": rows["in"]["rmse"], "Pearson in": rows["in"]["pearson"],
        "Spearman top half": rows.get("top_half", {}).get("spearman"),
        "Spearman top 1%": rows.get("top_1pct", {}).get("spearman"), "mean g in": rows["in"]["mean_g_hat"],
        "g out/in (ood)": rows["ratio_g_out_in"].get("ood"),
        "g out/in (top half)": rows["ratio_g_out_in"].get("top_half"),
        "g out/in (top 1%)": rows["ratio_g_out_in"].get("top_1pct"), "coverage in": rows["in"]["coverage"],
        "coverage ood": rows.get("ood", {}).get("coverage"), "Spearman(g, abs err)": rows["spearman_g_abs_err"],
    } for penalty, rows in report.items()]).set_index("penalty").astype(float).reset_index()  # None -> NaN -> "-"
    relaxed = pd.DataFrame([{"penalty": penalty, **{t: f"{v['mean_r_hat']:.3f} / {v['mean_g_hat']:.3f}"
                                                    for t, v in rows["relaxed_inputs"].items()}}
                            for penalty, rows in report.items()])
    return (to_markdown(fit) + "\nReward on relaxed inputs ((1 - t) one-hot + t random simplex point per position; "
            "mean r_hat / mean g_hat):\n\n" + to_markdown(relaxed))

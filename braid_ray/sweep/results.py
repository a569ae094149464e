"""A finished sweep as tables, a heatmap and the chosen config: pure functions over one row per trial.

Selection follows the paper: a configuration's score is the mean, over its seeds, of each trial's mean
oracle score on its budget of final samples; trials stopped early or failed spent no budget and are not
candidates. The chosen config keeps the base ``run.seed`` (the seed of the shared reward and pretrained model).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

from braid_ray.eval.report import to_markdown
from braid_ray.sweep.spec import METRIC, SEED_KEY, Sweep, set_dotted, trial_config

ALPHA, STRENGTH = "finetune.alpha", "finetune.strength"
# Per-trial result columns, after the searched keys.
RESULT_COLUMNS = ["status", "step", "objective", "r_hat", "g_hat", "kl", METRIC, "oracle_mean", "valid_share",
                  "oracle_std", "oracle_max", "oracle_queries", "sample_r_hat", "sample_g_hat", "distinct", "device", "seconds", "finished_at",
                  "trial_id", "error"]
SUMMARY_METRICS = [METRIC, "valid_share", "r_hat", "g_hat", "kl", "objective"]


def trials_frame(rows: list[dict], keys: list[str]) -> pd.DataFrame:
    """One row per trial: the searched ``keys``, then RESULT_COLUMNS (NaN where a trial did not report it).

    Each input row holds a trial's config values (dotted keys), its last reported metrics, and ``error``.
    ``status`` is ``finished`` (budget spent), ``stopped`` (early-stopped, no budget spent) or ``error``.
    """
    frame = pd.DataFrame(rows)
    for col in [*keys, *RESULT_COLUMNS]:
        if col not in frame:
            frame[col] = np.nan
    queries = frame["oracle_queries"].fillna(0)
    frame["status"] = np.where(frame["error"].notna(), "error", np.where(queries > 0, "finished", "stopped"))
    frame["oracle_queries"] = queries.astype(int)
    return frame[[*keys, *RESULT_COLUMNS]].sort_values(keys, kind="stable").reset_index(drop=True)


def group_keys(keys: list[str]) -> list[str]:
    """The searched keys that define a configuration: all but the seed."""
    return [k for k in keys if k != SEED_KEY]


def seed_table(trials: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of each configuration's finished trials, best selection score first."""
    done = trials[trials["status"] == "finished"]
    by = group_keys(keys)
    if done.empty:
        return pd.DataFrame(columns=[*by, "seeds"])
    grouped = done.groupby(by, sort=False, dropna=False) if by else done.groupby(lambda _: 0)
    table = grouped[SUMMARY_METRICS].agg(["mean", "std"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    table.insert(0, "seeds", grouped.size())
    table = table.reset_index(drop=not by).sort_values(f"{METRIC}_mean", ascending=False, kind="stable")
    return table.reset_index(drop=True)


def seed_markdown(table: pd.DataFrame, keys: list[str]) -> str:
    """The seed table as markdown with mean±std cells (no trailing newline)."""
    by = group_keys(keys)
    cells = []
    for _, row in table.iterrows():
        cell = {k: f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in by}
        cell["seeds"] = int(row["seeds"])
        for m in SUMMARY_METRICS:
            std = row[f"{m}_std"]
            cell[m] = f"{row[f'{m}_mean']:.4g}" + ("" if np.isnan(std) else f" ± {std:.2g}")
        cells.append(cell)
    return to_markdown(pd.DataFrame(cells, columns=[*by, "seeds", *SUMMARY_METRICS])).rstrip("\n")


def best_params(table: pd.DataFrame, keys: list[str]) -> dict:
    """The searched values (seed excluded) of the configuration with the best selection score."""
    if table.empty:
        raise ValueError("no trial finished with its oracle budget spent: nothing to select")
    row = table.iloc[0]
    return {k: row[k].item() if hasattr(row[k], "item") else row[k] for k in group_keys(keys)}


def best_config_yaml(sweep: Sweep, params: dict, table: pd.DataFrame, queries: int) -> str:
    """A full config (loadable by ``load_config``) with the chosen values, headed by how it was chosen."""
    cfg = trial_config(sweep.base.to_dict(), params)
    tree = cfg.to_dict()
    set_dotted(tree, SEED_KEY, sweep.base.run.seed)
    row = table.iloc[0]
    seeds = sweep.search.get(SEED_KEY, {}).get("grid")
    chosen = " ".join(f"{k}={v}" for k, v in params.items()) or "(the base config)"
    header = [
        f"Best configuration of sweep {sweep.name} ({sweep.source}), method {sweep.method}:",
        f"  {chosen}",
        f"  selection score {row[f'{METRIC}_mean']:.4g}"
        + ("" if np.isnan(row[f"{METRIC}_std"]) else f" ± {row[f'{METRIC}_std']:.2g}")
        + f" over {int(row['seeds'])} seed(s){f' {seeds}' if seeds else ''},"
        f" {sweep.settings.oracle_budget} oracle queries per trial, {queries} in the whole sweep.",
        f"run.seed is the base seed: the reward and pretrained model in {sweep.base.run.dir} were trained with it.",
        "Run: python launch/finetune.py --config <this file>",
    ]
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(tree, sort_keys=False)


def score_map(trials: pd.DataFrame, search: dict[str, dict[str, list]], best: dict, reference: dict | None,
              title: str) -> bytes | None:
    """PNG of the selection score over alpha x penalty strength (averaged over seeds and any other key):
    a heatmap when both take listed values (grid / choice), a scatter when either is drawn from a range; the
    selected configuration ``best`` is outlined in red. None if either key was not searched."""
    if ALPHA not in search or STRENGTH not in search:
        return None
    listed = all(kind in ("grid", "choice") for key in (ALPHA, STRENGTH) for kind in search[key])
    done = trials[trials["status"] == "finished"]
    if done.empty:
        return None
    cells = done.groupby([STRENGTH, ALPHA])[METRIC].agg(["mean", "std"]).reset_index()
    alphas, strengths = sorted(cells[ALPHA].unique()), sorted(cells[STRENGTH].unique())
    fig = Figure(figsize=(1.6 + 1.25 * min(len(alphas), 8), 1.4 + 0.9 * min(len(strengths), 8)))
    ax = fig.subplots()
    if listed and len(alphas) * len(strengths) <= 64:
        grid = np.full((len(strengths), len(alphas)), np.nan)
        for _, c in cells.iterrows():
            grid[strengths.index(c[STRENGTH]), alphas.index(c[ALPHA])] = c["mean"]
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        for _, c in cells.iterrows():
            i, j = strengths.index(c[STRENGTH]), alphas.index(c[ALPHA])
            text = f"{c['mean']:.3f}" + ("" if np.isnan(c["std"]) else f"\n± {c['std']:.3f}")
            dark = hi > lo and (c["mean"] - lo) / (hi - lo) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if dark else "white")
        bi, bj = strengths.index(best[STRENGTH]), alphas.index(best[ALPHA])
        ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(strengths)), [f"{v:g}" for v in strengths])
    else:
        image = ax.scatter(cells[ALPHA], cells[STRENGTH], c=cells["mean"], cmap="viridis", s=60)
        ax.scatter([best[ALPHA]], [best[STRENGTH]], s=160, facecolors="none", edgecolors="red", linewidths=2)
        if cells[ALPHA].min() > 0:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("alpha (KL weight, finetune.alpha)")
    ax.set_ylabel("penalty strength (finetune.strength)")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("selection score on the budget (invalid designs = worst offline)")
    lines = [title, "cells: mean ± std over seeds; red: selected"]
    if reference is not None:
        lines[-1] += f"; pretrained {reference[METRIC]:.3f}, best offline y {reference['best_offline_y']:.3f}"
    ax.set_title("\n".join(lines), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


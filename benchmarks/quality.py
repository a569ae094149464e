"""Design quality per task x method x alpha x seed, scored by the task's oracle (issue 4).

For each seed the upstream stages (data split, reward ensemble, pretrained diffusion) run once through the
pipeline (``runs/bench/<task>-seed<s>``, reused when present); then every method is fine-tuned in-process at
every alpha and 640 designs are sampled and scored. Rows are appended to
``benchmarks/results/quality/<task>-seed<s>.jsonl`` as they finish, so an interrupted run resumes.
Reference rows per seed: Offline (top), Pretrained, and Grad. (gradient ascent on r_hat).

    .venv/bin/python benchmarks/quality.py run --task tfbind8 --seeds 0 1 2 [--set key=value ...]
    .venv/bin/python benchmarks/quality.py report          # tables + plots from every .jsonl present

Selecting alpha, three ways, all reported: by the oracle (the best the grid can do; an upper bound), the
paper's way (the oracle on a budget of 64 designs per run), and without any oracle (each method's own
estimate of its samples, mean r_hat - g_hat, the quantity the method is conservative about).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from braid_ray import pipeline  # noqa: E402
from braid_ray.baselines.grad import gradient_ascent  # noqa: E402
from braid_ray.config import load_config  # noqa: E402
from braid_ray.eval import method_metrics  # noqa: E402
from braid_ray.evaluate import LABELS, sample_codes  # noqa: E402
from braid_ray.finetune.run import FinetuneJob, build_finetuner, load_pretrained, load_reward  # noqa: E402
from braid_ray.finetune.trainer import METHODS  # noqa: E402
from braid_ray.diffusion.pretrain import build_backbone  # noqa: E402
from braid_ray.diffusion.sampler import FineTunedPolicy  # noqa: E402
from braid_ray.reward.fit import score  # noqa: E402
from braid_ray.rundir import RunDir  # noqa: E402
from braid_ray.stages import data_stage, oracle_stage  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality"
PRESETS = {"tfbind8": ROOT / "configs" / "tfbind8.yaml", "utr_mrl": ROOT / "configs" / "utr_mrl.yaml"}
BUDGET = 64  # oracle queries per run for the paper's selection

log = logging.getLogger("quality")


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["method"], r["alpha"]) for r in map(json.loads, path.read_text().splitlines())}


def _label(method: str, strength: float) -> str:
    """The row's method name; penalties with a strength (lcb, bonus) carry it, e.g. 'BRAID-Bonus (k=0.3)'."""
    return f"{LABELS[method]} (k={strength:g})" if METHODS[method] in ("lcb", "bonus") else LABELS[method]


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_seed(task: str, seed: int, alphas: list[float], methods: list[str], overrides: list[str]) -> None:
    cfg = load_config(PRESETS[task], [f"run.dir={ROOT / 'runs' / 'bench' / f'{task}-seed{seed}'}",
                                      f"run.seed={seed}", "ray.num_workers=0", *overrides])
    out = RESULTS / f"{task}-seed{seed}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    start = time.perf_counter()
    pipeline.run(cfg, stages=("data", "oracle", "reward", "pretrain"))
    run = RunDir(cfg.run.dir)
    data = data_stage(cfg, run)
    oracle = oracle_stage(cfg, run, data)
    d, s, n = data.d, data.splits, cfg.eval.n_samples
    off_codes = d.codes[s.off]
    best_offline = float(oracle.score(off_codes).max())
    base = {"task": task, "seed": seed, "best_offline": best_offline}

    def record(method: str, alpha: float | None, codes: np.ndarray, extra: dict) -> None:
        scores = oracle.score(codes)
        metrics = method_metrics(codes, scores, best_offline, d.codes)
        budget = np.random.default_rng(seed).choice(len(scores), BUDGET, replace=False)
        row = {**base, "method": method, "alpha": alpha, **metrics, "oracle_budget_mean": float(scores[budget].mean()),
               "oracle_budget_queries": BUDGET, **extra}
        _append(out, row)
        log.info("%s seed %d %s alpha %s: median %.3f, distinct %d", task, seed, method, alpha, metrics["median"],
                 metrics["distinct"])

    reward = load_reward(run.uri, "none", cfg.finetune.strength)
    if ("Offline (top)", None) not in done:
        record("Offline (top)", None, off_codes[np.argsort(-d.y[s.off])[:n]], {})
    if ("Grad. (r_hat)", None) not in done:
        t = time.perf_counter()
        top = off_codes[np.argsort(-d.y[s.off])[:n]]
        record("Grad. (r_hat)", None, gradient_ascent(reward, top, cfg.eval.grad_steps, cfg.eval.grad_lr),
               {"seconds": time.perf_counter() - t})
    backbone = build_backbone(cfg.diffusion, d.length, cfg.finetune.temperature, cfg.finetune.straight_through)
    if ("Pretrained", None) not in done:
        policy = FineTunedPolicy(backbone, load_pretrained(cfg, run.uri, d.length), cfg.finetune.parameterization)
        record("Pretrained", None, sample_codes(policy, n, cfg.eval.batch_size, seed)[0], {})
    for alpha in alphas:
        for method in methods:
            label = _label(method, cfg.finetune.strength)
            if (label, alpha) in done:
                continue
            c = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, alpha=alpha))
            t = time.perf_counter()
            tuner = build_finetuner(c, FinetuneJob(run.uri, method, d.length), seed=seed)
            history = tuner.train()
            train_s = time.perf_counter() - t
            codes, dist = sample_codes(tuner.policy, n, c.eval.batch_size, seed)
            r, g = score(load_reward(run.uri, METHODS[method], c.finetune.strength), codes, METHODS[method])
            last = pd.DataFrame(history).tail(10).mean(numeric_only=True)
            record(label, alpha, codes, {
                "seconds": train_s, "objective": float(last["objective"]), "kl": float(last["kl"]),
                "r_hat_samples": float(np.mean(r)), "conservative_samples": float(np.mean(r - g)),
                "onehot_distance": float(np.mean(dist)), "steps": c.finetune.steps})
    log.info("%s seed %d: done in %.0f s", task, seed, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------
# Report


def load_rows() -> pd.DataFrame:
    rows = [json.loads(line) for p in sorted(RESULTS.glob("*.jsonl")) for line in p.read_text().splitlines()]
    if not rows:
        raise SystemExit(f"no results in {RESULTS}; run `quality.py run` first")
    return pd.DataFrame(rows)


def _pm(x: pd.Series, digits: int = 3) -> str:
    x = x.dropna()
    if x.empty:
        return "-"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}" if len(x) > 1 else f"{x.mean():.{digits}f}"


def _chosen(g: pd.DataFrame, key, diverse: bool = False) -> str:
    """Per seed, the run maximising ``key`` (optionally among runs with >= 100 distinct designs); returns
    'alpha(s): median mean ± std, distinct'."""
    picks = []
    for _, runs in g.groupby("seed"):
        pool = runs[runs["distinct"] >= 100] if diverse else runs
        if not pool.empty:
            picks.append(pool.loc[key(pool).idxmax()])
    if not picks:
        return "none"
    p = pd.DataFrame(picks)
    alphas = "/".join(f"{a:g}" for a in p["alpha"])
    return f"{alphas}: {_pm(p['median'])} ({p['distinct'].mean():.0f} distinct)"


def report(df: pd.DataFrame) -> str:
    lines = []
    for task, t in df.groupby("task"):
        seeds = sorted(t["seed"].unique())
        lines += [f"### {task} ({len(seeds)} seeds: {', '.join(map(str, seeds))}; mean ± std over seeds)", "",
                  f"Best offline design (oracle): {_pm(t.groupby('seed')['best_offline'].first())}.", "",
                  "| method | alpha | median | mean | p90 | max | frac above best offline | distinct /640 | "
                  "3-mer Pearson | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
        order = {m: i for i, m in enumerate(dict.fromkeys(t["method"]))}  # first appearance: references first
        t = t.assign(_order=t["method"].map(order)).sort_values(["_order", "alpha"], na_position="first", kind="stable")
        for (method, alpha), g in t.groupby(["method", "alpha"], dropna=False, sort=False):
            secs = _pm(g["seconds"], 0) if "seconds" in g else "-"
            lines.append(f"| {method} | {'-' if pd.isna(alpha) else f'{alpha:g}'} | {_pm(g['median'])} | "
                         f"{_pm(g['mean'])} | {_pm(g['p90'])} | {_pm(g['max'])} | {_pm(g['frac_above_best'])} | "
                         f"{_pm(g['distinct'], 0)} | {_pm(g['kmer_pearson'])} | {secs} |")
        tuned = t[t["alpha"].notna()]
        if not tuned.empty:
            lines += ["", "Alpha selection per method (oracle medians, mean ± std over seeds; the grid's alphas "
                      "are chosen per seed by the rule, then the chosen runs' medians are averaged):", "",
                      "| method | by oracle | by oracle, >= 100 distinct | worst alpha | by budget (64 queries/run) "
                      "| by own estimate (no oracle) |", "|---|---|---|---|---|---|"]
            for method, g in tuned.groupby("method", sort=False):
                cells = [_chosen(g, lambda x: x["median"]), _chosen(g, lambda x: x["median"], diverse=True),
                         _chosen(g, lambda x: -x["median"]), _chosen(g, lambda x: x["oracle_budget_mean"]),
                         _chosen(g, lambda x: x["conservative_samples"])]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(df["task"].unique())
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False, sharex="col")
    for col, task in enumerate(tasks):
        t = df[df["task"] == task]
        top, bottom = axes[0, col], axes[1, col]
        for method, g in t[t["alpha"].notna()].groupby("method", sort=False):
            for ax, column in ((top, "median"), (bottom, "distinct")):
                stats = g.groupby("alpha")[column].agg(["mean", "min", "max"]).reset_index()
                spread = [stats["mean"] - stats["min"], stats["max"] - stats["mean"]]  # seeds' range: often bimodal
                ax.errorbar(stats["alpha"], stats["mean"], yerr=spread, marker="o", capsize=3, label=method)
        for method, style in (("Pretrained", ":"), ("Grad. (r_hat)", "-.")):
            ref = t[t["method"] == method]
            if not ref.empty:
                top.axhline(ref["median"].mean(), color="grey", linestyle=style, label=f"{method}")
                bottom.axhline(ref["distinct"].mean(), color="grey", linestyle=style)
        top.axhline(t["best_offline"].mean(), color="crimson", linestyle="--", label="best offline design")
        bottom.axhline(100, color="crimson", linestyle="--", label="100 distinct")
        top.set_ylabel(f"oracle median of {int(t['n'].max())} designs")
        bottom.set_ylabel("distinct designs")
        bottom.set_xlabel("alpha (KL weight; reward in z-units of y); bars: range over seeds")
        top.set_title(task)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--task", choices=sorted(PRESETS), default="tfbind8")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--alphas", type=float, nargs="*", default=[0.001, 0.01, 0.1, 1.0])
    r.add_argument("--methods", nargs="+", default=["strl", "braid_boot", "braid_bonus"])
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--set", nargs="*", default=[], dest="overrides", help="config key=value overrides for every run")
    sub.add_parser("report")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "run":
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            run_seed(args.task, seed, args.alphas, args.methods, args.overrides)
    else:
        df = load_rows()
        print(report(df))
        print(f"plot: {plot(df, RESULTS.parent / 'quality.png')}")


if __name__ == "__main__":
    main()

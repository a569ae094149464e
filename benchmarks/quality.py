"""Design quality per task x method x alpha x seed, through the pipeline's own stages (issue 12).

For each seed the upstream stages (data split, oracle, reward ensemble, pretrained diffusion) run once in
``runs/bench2/<task>/seed<s>/upstream``; each alpha then gets a run directory of its own that starts from a copy
of those stages, so `launch/finetune.py`'s fine-tuning and evaluation stages run unchanged (the whole path's
KL, the plateau rule, the validity panel, the oracle). One JSON row per (seed, alpha, method) is appended to
``benchmarks/results/quality_v2/<task>.jsonl`` as it finishes, with the reward and pretrained stages'
fingerprints, so an interrupted run resumes and later sessions add seeds or alphas.

    .venv/bin/python benchmarks/quality.py run --task tfbind8 --seeds 0 1 2 3 4 --alphas 0.01 0.1 [--set k=v ...]
    .venv/bin/python benchmarks/quality.py report     # tables, paired differences with CIs, both backbones, plot

Comparisons are paired by seed (the same split, reward and pretrained model): the mean difference of BRAID's
oracle median minus STRL's over seeds, with a Student-t 95% interval over seeds and the percentile bootstrap's
beside it (over 3-5 seeds the bootstrap interval is no wider than the differences' range). The issue-4 rows
(results/quality/*.jsonl) are kept as history; they predate the whole-path KL.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from braid_ray import pipeline
from braid_ray.config import load_config, without_later_defaults
from braid_ray.eval.stats import bootstrap_ci, t_interval
from braid_ray.methods import BASELINES, METHODS
from braid_ray.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality_v2"
PRESETS = {name: ROOT / "configs" / f"{name}.yaml"
           for name in ("tfbind8", "utr_mrl", "tfbind8_masked", "utr_mrl_masked")}
UPSTREAM = ("data", "oracle", "reward", "pretrain", "baselines")  # baselines: DDOM's and CFG's conditional models
SHARED = ("data", "oracle", "reward")  # the stages two backbones of one task can share (--share-upstream)
LABELS = {name: m.label for name, m in METHODS.items()}

log = logging.getLogger("quality")


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["seed"], r["alpha"], r["method"]) for r in map(json.loads, path.read_text().splitlines())}


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


@contextmanager
def _held(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) while the block reads and appends its rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_reproduced(path: Path, seed: int, label: str, metrics: dict) -> None:
    """A seed's rows are paired across runs only if its upstream stages are the same models: a re-run that retrained
    them must reproduce the stored alpha-free rows (Pretrained, Grad.) exactly; say so either way."""
    if label not in ("Pretrained", "Grad. (r_hat)"):
        return
    stored = [r for r in map(json.loads, path.read_text().splitlines())
              if r["seed"] == seed and r["alpha"] is None and r["method"] == label]
    if stored and stored[0]["median"] != metrics["median"]:
        log.warning("seed %d: %s's median is %.6f now and %.6f in %s: the upstream models differ from the stored "
                    "rows', so new rows are not paired with them", seed, label, metrics["median"], stored[0]["median"],
                    path.name)
    elif stored:
        log.info("seed %d: %s reproduces its stored row (median %.6f)", seed, label, metrics["median"])


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_dir(seed_dir: Path, name: str) -> Path:
    """A run directory ``seed_dir/name`` that starts from a copy of the seed's upstream stages (reused, not
    retrained)."""
    run = seed_dir / name
    for stage in UPSTREAM:
        _copy_missing(seed_dir / "upstream" / stage, run / stage)
    return run


def _copy_missing(src: Path, dst: Path) -> None:
    """Copy a finished stage folder that ``dst`` lacks; a folder of stages (baselines/<name>) is merged stage by
    stage, so a baseline trained upstream after a run directory was made is copied there, not retrained."""
    if not src.is_dir() or (src / "stage.pending.json").exists():
        return
    if not (src / "stage.json").exists():  # a folder of stages: each finished one that dst lacks
        for child in src.iterdir():
            _copy_missing(child, dst / child.name)
    elif not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ray"))


def run_seed(task: str, seed: int, alphas: list[float], methods: list[str], overrides: list[str],
             variant: str = "", runs: Path = ROOT / "runs" / "bench2", share_from: str | None = None) -> None:
    """One seed's upstream stages, then each alpha's fine-tuning and evaluation in a run directory of its own
    (alpha<a>[-<variant>]; methods added later at an alpha already evaluated get alpha<a>[-<variant>]-<methods>, so
    a finished evaluation is never re-run or replaced). Without fine-tuned ``methods``, only the steering baselines' rows (they do not depend on
    alpha): one evaluation in steering-<baselines>.
    A ``variant`` (e.g. "K50" with --set finetune.k=50) writes its rows to <task>-<variant>.jsonl under the task
    name <task>-<variant>, beside the preset's own rows, and reuses the seed's upstream stages. ``share_from``
    (another task, e.g. utr_mrl for utr_mrl_masked) copies that task's finished SHARED stages of the same seed
    first, so both backbones fine-tune on the same split, oracle and reward ensemble and their rows pair; a copied
    stage made under another config is refused by the pipeline (a StageConflict naming the keys)."""
    seed_dir = runs / task / f"seed{seed}"
    if share_from:
        for stage in SHARED:
            src, dst = runs / share_from / f"seed{seed}" / "upstream" / stage, seed_dir / "upstream" / stage
            _copy_missing(src, dst)
            mine, theirs = (json.loads(p.read_text())["fingerprint"] if p.exists() else None
                            for p in (dst / "stage.json", src / "stage.json"))
            if mine != theirs:
                log.warning("%s seed %d: stage %s is not %s's (%s against %s): the two backbones' rows do not pair",
                            task, seed, stage, share_from, mine, theirs)
    base = load_config(PRESETS[task], [f"run.dir={seed_dir / 'upstream'}", f"run.seed={seed}", "ray.num_workers=0",
                                       "tracking.progress=lines", *overrides])
    name = f"{task}-{variant}" if variant else task
    out = RESULTS / f"{name}.jsonl"
    done = _done(out)
    pipeline.run(base, stages=UPSTREAM)
    up = RunDir(base.run.dir)
    fingerprints = {s: up.stage(s).read_json("stage.json")["fingerprint"] for s in ("reward", "pretrain")}
    steering = [BASELINES[m].label for m in base.baselines.methods]  # rows that do not depend on alpha either
    if not methods:
        if not all((seed, None, label) in done for label in steering):
            folder = "steering-" + "-".join(base.baselines.methods) + (f"-{variant}" if variant else "")
            _evaluate(base, _run_dir(seed_dir, folder), alphas[0], [], out, done, name, fingerprints)
        return
    for alpha in alphas:
        todo = [m for m in methods if (seed, alpha, LABELS[m]) not in done]
        if todo or not all((seed, None, label) in done for label in steering):
            folder = _alpha_folder(seed_dir, alpha, variant, todo or base.baselines.methods)
            _evaluate(base, _run_dir(seed_dir, folder), alpha, todo, out, done, name, fingerprints)


def _alpha_folder(seed_dir: Path, alpha: float, variant: str, methods: list[str]) -> str:
    """alpha<a>[-<variant>], or with -<methods> added when that one already holds a finished evaluation (of other
    methods), which is kept as it is."""
    folder = f"alpha{alpha:g}-{variant}" if variant else f"alpha{alpha:g}"
    if (seed_dir / folder / "eval" / "stage.json").exists():
        folder += "-" + "-".join(methods)
    return folder


def _evaluate(base, run: Path, alpha: float, todo: list[str], out: Path, done: set, name: str,
              fingerprints: dict) -> None:
    """Fine-tune ``todo`` at ``alpha`` and evaluate in ``run``; append the rows not yet in ``out``."""
    seed = base.run.seed
    cfg = dataclasses.replace(base, run=dataclasses.replace(base.run, dir=str(run)),
                              finetune=dataclasses.replace(base.finetune, alpha=alpha, methods=todo))
    start = time.perf_counter()
    pipeline.run(cfg)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    common = {"task": name, "seed": seed, "fingerprints": fingerprints, "best_offline": metrics["best_offline"],
              "selection_rule": metrics["selection"].get("rule", "raw"),
              "config": {k: v for k, v in cfg.section("finetune")["finetune"].items() if k != "methods"}}
    # The design sets that do not depend on alpha (Pretrained, the baselines, the references), once per seed.
    fixed = {n: m for n, m in {**metrics["methods"], **metrics["references"]}.items() if n not in LABELS.values()}
    with _held(out):  # another process (another alpha of the same seed) may append to the same file
        done |= _done(out)  # the rows it appended meanwhile
        for label, m in fixed.items():
            if (seed, None, label) in done:
                _check_reproduced(out, seed, label, m)
                continue
            knobs = metrics.get("baselines", {}).get(label)
            setting = {"setting": knobs["chosen"], "setting_queries": knobs["queries"]} if knobs else {}
            _append(out, {**common, "alpha": None, "method": label, **_scalars(m), **setting})
            done.add((seed, None, label))
        for method in todo:
            summary = json.loads((run / "finetune" / method / "summary.json").read_text())
            _append(out, {**common, "alpha": alpha, "method": LABELS[method],
                          **_scalars(metrics["methods"][LABELS[method]]),
                          **{f"ft_{k}": v for k, v in _scalars(summary).items()},
                          "ft_stopped": summary.get("stopped")})
    log.info("%s seed %d alpha %g: %s in %.0f s", name, seed, alpha, ", ".join(todo) or "baselines",
             time.perf_counter() - start)


def reselect(task: str, seeds: list[int], runs: Path) -> int:
    """Rows made before the validity-aware selection (no ``selection_rule``) whose run directories are still on
    disk: each fine-tuned method's selection designs (the same stream, so the same designs) rescored under the
    validity rule its evaluation recorded (``rescore_selection``). Only where the designs' plain mean reproduces the
    row's old score (the same designs) does the row get the new ``selection_score`` with ``selection_rule`` "valid",
    the old score kept as ``selection_score_raw``; nothing else in it changes. The steering baselines' rows are
    left as they are (their settings would have to be chosen again): the report marks them. A row is
    matched by seed, method and its whole fine-tuning config. Returns the rows rescored."""
    from braid_ray.evaluate import rescore_selection
    from braid_ray.stages import data_stage, oracle_stage

    out = RESULTS / f"{task}.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    changed = 0
    for seed in seeds:
        for run in sorted((runs / task / f"seed{seed}").glob("alpha*")):
            if not (run / "eval" / "stage.json").exists():
                continue
            cfg = load_config(run / "eval" / "config.yaml")
            finetune = without_later_defaults({k: v for k, v in cfg.section("finetune")["finetune"].items()
                                               if k != "methods"})  # rows made before a later key lack it
            stale = [r for r in rows if r["seed"] == seed and without_later_defaults(r.get("config") or {}) == finetune
                     and r.get("selection_rule") is None and r["method"] in LABELS.values()]
            if not stale:
                continue
            rd = RunDir(str(run))
            data = data_stage(cfg, rd)
            scores = rescore_selection(cfg, rd, data, oracle_stage(cfg, rd, data))
            for r in stale:
                new = scores.get(r["method"])
                if new is None:
                    continue
                if abs(new["selection_score_raw"] - r["selection_score"]) > 1e-6:
                    log.warning("%s seed %d %s alpha %g: the selection designs' mean is %.6f now and %.6f in the row: "
                                "other designs (another device or thread count?), so the row is left as it is",
                                task, seed, r["method"], r["alpha"], new["selection_score_raw"], r["selection_score"])
                    continue
                r.update({**new, "selection_rule": "valid"})
                changed += 1
                log.info("%s seed %d %s alpha %g: selection score %.4f (plain mean %.4f, %.0f%% valid)", task, seed,
                         r["method"], r["alpha"], new["selection_score"], new["selection_score_raw"],
                         100 * new["selection_valid_share"])
    if changed:
        tmp = out.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out)
    return changed


# ---------------------------------------------------------------------------------------------------
# Report


def paired(df: pd.DataFrame, key: str, method: str, baseline: str = "STRL") -> pd.DataFrame:
    """Per alpha: method minus baseline on ``key``, paired by seed: mean, 95% t and bootstrap intervals, seeds,
    wins."""
    rows = []
    tuned = df[df["alpha"].notna()]
    for alpha, g in tuned.groupby("alpha"):
        a = g[g["method"] == method].set_index("seed")[key]
        b = g[g["method"] == baseline].set_index("seed")[key]
        d = (a - b).dropna()
        if d.empty:
            continue
        rows.append({"alpha": alpha, "mean": d.mean(), **_bounds(d), "seeds": len(d), "wins": int((d > 0).sum())})
    return pd.DataFrame(rows)


def at_matched_kl(df: pd.DataFrame, key: str, method: str, baseline: str = "STRL",
                  within: float = 2.0) -> pd.DataFrame:
    """Per alpha of ``method``: its ``key`` minus the ``baseline`` row of the same seed whose whole-path KL is
    nearest to its own (on a log scale, over every alpha the baseline ran), kept where the two KLs are within a
    factor ``within``; so a method is compared with the baseline spending the same KL, not the same alpha. Columns:
    alpha, kl and base_kl (means over the matched seeds), base_alphas (the baseline's matched alphas), mean, the
    ``_bounds`` intervals, seeds (matched), of (seeds with the method at that alpha), wins."""
    tuned = df[df["alpha"].notna() & df["ft_kl"].gt(0)] if "ft_kl" in df.columns else df.iloc[:0]
    base = tuned[tuned["method"] == baseline]
    rows = []
    for alpha, g in tuned[tuned["method"] == method].groupby("alpha"):
        pairs = []
        for r in g.itertuples():
            b = base[base["seed"] == r.seed]
            if b.empty:
                continue
            near = b.loc[(np.log(b["ft_kl"]) - np.log(r.ft_kl)).abs().idxmin()]
            if max(near["ft_kl"], r.ft_kl) <= within * min(near["ft_kl"], r.ft_kl):
                pairs.append((getattr(r, key) - near[key], r.ft_kl, near["ft_kl"], near["alpha"]))
        if not pairs:
            continue
        d = pd.Series([x[0] for x in pairs])
        rows.append({"alpha": alpha, "kl": np.mean([x[1] for x in pairs]), "base_kl": np.mean([x[2] for x in pairs]),
                     "base_alphas": sorted({x[3] for x in pairs}), "mean": d.mean(), **_bounds(d), "seeds": len(d),
                     "of": len(g), "wins": int((d > 0).sum())})
    return pd.DataFrame(rows)


def _bounds(d: pd.Series) -> dict[str, float]:
    """The 95% t interval (t_lo, t_hi) and percentile-bootstrap interval (lo, hi) of the mean of paired differences
    ``d`` over seeds; NaN with fewer than two."""
    (t_lo, t_hi), (lo, hi) = t_interval(d.to_numpy()), bootstrap_ci(d.to_numpy(), min_values=2)
    return {"t_lo": t_lo, "t_hi": t_hi, "lo": lo, "hi": hi}


def _intervals(b: dict[str, float]) -> str:
    """``_bounds`` as two table cells: the t interval, then the bootstrap's ("-" where undefined)."""
    if pd.isna(b["t_lo"]):
        return "- | -"
    return f"[{b['t_lo']:+.3f}, {b['t_hi']:+.3f}] | [{b['lo']:+.3f}, {b['hi']:+.3f}]"


def selected(tuned: pd.DataFrame) -> pd.DataFrame:
    """Per (seed, method), the fine-tuned row its own oracle budget selects: the highest selection score over its
    alphas, on designs drawn apart from the evaluated ones. The score is the validity-aware one (invalid designs
    counted as the worst offline design; ``selection_rule`` "valid") where every alpha of the seed and method has
    it, otherwise the plain oracle mean (the rule of rows made before 2026-12-04); column ``selected_by`` says
    which. Rows that predate the selection stream are left out."""
    if "selection_score" not in tuned.columns:
        return tuned.iloc[:0].assign(selected_by=[])
    tuned = tuned.dropna(subset=["selection_score"])
    rule = tuned["selection_rule"] if "selection_rule" in tuned.columns else pd.Series("raw", index=tuned.index)
    raw = tuned["selection_score_raw"] if "selection_score_raw" in tuned.columns else pd.Series(float("nan"),
                                                                                                 index=tuned.index)
    tuned = tuned.assign(_valid=tuned["selection_score"].where(rule == "valid"),
                         _raw=raw.fillna(tuned["selection_score"].where(rule != "valid")))
    picks = []
    for _, g in tuned.groupby(["seed", "method"]):
        by = "valid" if g["_valid"].notna().all() else "raw"
        picks.append(g.loc[[g[f"_{by}"].idxmax()]].assign(selected_by=by))
    if not picks:
        return tuned.iloc[:0].assign(selected_by=[]).drop(columns=["_valid", "_raw"])
    return pd.concat(picks).drop(columns=["_valid", "_raw"])


def at_selected_alpha(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per seed and method, ``key`` at the alpha that the method's own oracle budget picks (``selected``), so the
    evaluated designs never chose their setting."""
    best = selected(df[df["alpha"].notna()])
    return best[["seed", "method", "alpha", key, "selected_by"]].reset_index(drop=True)


def _pm(x: pd.Series, digits: int = 3) -> str:
    x = x.dropna()
    if x.empty:
        return "-"
    if len(x) == 1:
        return f"{x.mean():.{digits}f}"
    lo, hi = bootstrap_ci(x.to_numpy())
    return f"{x.mean():.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def report(df: pd.DataFrame) -> str:
    from braid_ray.evaluate import SELECTION_QUERIES

    lines = []
    cols = [("median", "oracle median, all designs"), ("median_valid", "oracle median, valid designs"),
            ("median_penalized", "oracle median, invalid designs scored as the worst offline"),
            ("valid_share", "valid share"), ("kmer_pearson", "3-mer r vs D's top 0.1%"),
            ("ft_kl", "whole-path KL (nats)"), ("ft_alpha_kl_z", "alpha * KL (z)"),
            ("ft_reward_gain_z", "reward gain (z)"), ("elbo", "ELBO under the pretrained model (nats)"),
            ("diversity", "diversity (mean pairwise Hamming)"),
            ("distinct", "distinct designs")]
    for task, t in df.groupby("task"):
        seeds = sorted(t["seed"].unique())
        lines += [f"### {task} ({len(seeds)} seeds: {', '.join(map(str, seeds))}; mean [95% bootstrap CI over seeds])",
                  "", f"Best offline design (oracle): {_pm(t.groupby('seed')['best_offline'].first())}.", ""]
        present = [(c, h) for c, h in cols if c in t.columns]
        lines += ["| method | alpha | " + " | ".join(h for _, h in present) + " |",
                  "|---|---|" + "---|" * len(present)]
        order = {m: i for i, m in enumerate(dict.fromkeys(t["method"]))}
        t = t.assign(_o=t["method"].map(order)).sort_values(["_o", "alpha"], na_position="first", kind="stable")
        for (method, alpha), g in t.groupby(["method", "alpha"], dropna=False, sort=False):
            a = "-" if pd.isna(alpha) else f"{alpha:g}"
            lines.append(f"| {method} | {a} | " + " | ".join(_pm(g[c]) for c, _ in present) + " |")
        for method in [m for m in t["method"].unique() if m.startswith("BRAID")]:
            for key, what in (("median", "all designs"), ("median_penalized", "all designs, invalid ones failing")):
                if key not in t.columns:
                    continue
                p = paired(t, key, method)
                if p.empty:
                    continue
                lines += ["", f"{method} minus STRL, oracle median over {what}, paired by seed:", "",
                          "| alpha | mean difference | 95% t interval | 95% bootstrap | seeds | BRAID ahead in |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| {r.alpha:g} | {r.mean:+.3f} | {_intervals(r._asdict())} | {r.seeds} | {r.wins} |"
                          for r in p.itertuples()]
                chosen = at_selected_alpha(t, key)
                a = chosen[chosen["method"] == method].set_index("seed")
                b = chosen[chosen["method"] == "STRL"].set_index("seed")
                d = (a[key] - b[key]).dropna()
                if len(d):
                    rules = {"valid": "validity-aware score", "raw": "plain oracle mean"}
                    picks = ", ".join(f"{s}: {a.loc[s, 'alpha']:g} vs {b.loc[s, 'alpha']:g} ("
                                      + " / ".join(dict.fromkeys(rules[x.loc[s, 'selected_by']] for x in (a, b))) + ")"
                                      for s in d.index)
                    lines += [f"| each at its selected alpha | {d.mean():+.3f} | {_intervals(_bounds(d))} | {len(d)} | "
                              f"{int((d > 0).sum())} |", "", f"Selected alphas by seed ({method} vs STRL, each by "
                              f"its own {SELECTION_QUERIES}-query oracle budget on separate designs): {picks}."]
                strl_alphas = t[(t["method"] == "STRL") & t["alpha"].notna()]["alpha"].nunique()
                m = at_matched_kl(t, key, method) if strl_alphas > 1 else pd.DataFrame()
                if not m.empty:
                    lines += ["", f"{method} minus STRL at the nearest whole-path KL (per seed, STRL's alpha whose KL is "
                              f"nearest to {method}'s, kept within a factor 2), oracle median over {what}:", "",
                              f"| {method} alpha | {method} KL (nats) | STRL alphas matched | STRL KL (nats) | "
                              "mean difference | 95% t interval | 95% bootstrap | seeds matched | BRAID ahead in |",
                              "|---|---|---|---|---|---|---|---|---|"]
                    lines += [f"| {r.alpha:g} | {r.kl:.3g} | {', '.join(f'{a:g}' for a in r.base_alphas)} | "
                              f"{r.base_kl:.3g} | {r.mean:+.3f} | {_intervals(r._asdict())} | {r.seeds} of {r.of} | "
                              f"{r.wins} |" for r in m.itertuples()]
        lines += _baselines_section(t)
        lines.append("")
    return "\n".join(lines)


def _at_selection(t: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per (seed, method): the alpha-free rows as they are, each fine-tuned method at its selected alpha."""
    keys = [k for k in keys if k in t.columns]
    fixed = t[t["alpha"].isna()][["seed", "method", "alpha", *keys]]
    tuned = selected(t[t["alpha"].notna()])
    return pd.concat([fixed, tuned[["seed", "method", "alpha", *keys]]], ignore_index=True)


def backbones(df: pd.DataFrame) -> str:
    """Each task run on both backbones (``<task>`` and ``<task>_masked``: the same seeds share the split, oracle and
    reward ensemble, only the pretrained model differs), every method on each, the fine-tuned ones at their
    selected alpha; and the masked minus the Gaussian oracle median, paired by seed."""
    keys = ["median", "median_penalized", "valid_share", "elbo", "diversity", "distinct"]
    heads = ["oracle median", "invalid failing", "valid share", "ELBO (nats)", "diversity", "distinct of 640"]
    digits = {"elbo": 1, "diversity": 2, "distinct": 0}
    lines = []
    for task in sorted(set(df["task"])):
        if f"{task}_masked" not in set(df["task"]):
            continue
        gauss = _at_selection(df[df["task"] == task], keys)
        masked = _at_selection(df[df["task"] == f"{task}_masked"], keys)
        seeds = sorted(set(gauss["seed"]) & set(masked["seed"]))
        lines += [f"### {task}: the Gaussian one-hot backbone against the masked one (seeds {', '.join(map(str, seeds))}; "
                  "fine-tuned methods at their selected alpha; values: mean [95% bootstrap CI over seeds]; masked "
                  "minus Gaussian oracle median, paired by seed: mean, 95% t and bootstrap intervals)", "",
                  "| method | backbone | alpha chosen | " + " | ".join(heads)
                  + " | masked minus Gaussian | 95% t interval | 95% bootstrap | seeds | masked ahead in |",
                  "|---|---|---|" + "---|" * (len(heads) + 5)]
        same = ("Offline (top)", "Offline (random)", "Grad. (r_hat)")  # the backbone plays no part in them
        for method in [m for m in dict.fromkeys([*gauss["method"], *masked["method"]])
                       if m not in same and not m.startswith("ref:")]:
            pair = [b[(b["method"] == method) & b["seed"].isin(seeds)].set_index("seed") for b in (gauss, masked)]
            if any(p.empty for p in pair):
                continue
            d = (pair[1]["median"] - pair[0]["median"]).dropna()
            diff = {"Gaussian": " | " * 4,
                    "masked": f"{d.mean():+.3f} | {_intervals(_bounds(d))} | {len(d)} | {int((d > 0).sum())}"}
            for name, p in zip(("Gaussian", "masked"), pair):
                alphas = "-" if p["alpha"].isna().all() else "/".join(f"{a:g}" for a in p.sort_index()["alpha"])
                cells = " | ".join(_pm(p[k], digits.get(k, 3)) if k in p else "-" for k in keys)
                lines.append(f"| {method} | {name} | {alphas} | {cells} | {diff[name]} |")
        lines += ["", "The offline rows, Grad. and the references are the same on both backbones (per seed the same "
                  "split and reward ensemble). ELBOs are not comparable across backbones (different bounds of different "
                  "models), only between rows of one backbone; their level also moves with the seed's shared draws.", ""]
    return "\n".join(lines)


def _baselines_section(t: pd.DataFrame) -> list[str]:
    """The steering baselines (no alpha) against each fine-tuned method at its selected alpha, paired by seed, and
    the setting each baseline's own oracle budget chose per seed."""
    steering = [b.label for b in BASELINES.values() if b.label in set(t["method"])]
    if not steering:
        return []
    table = []
    chosen = at_selected_alpha(t, "median")
    for label in steering:
        a = t[t["method"] == label].set_index("seed")["median"]
        for method in [m for m in LABELS.values() if m in set(chosen["method"])]:
            d = (a - chosen[chosen["method"] == method].set_index("seed")["median"]).dropna()
            if len(d):
                table.append(f"| {label} | {method} | {d.mean():+.3f} | {_intervals(_bounds(d))} | {len(d)} | "
                             f"{int((d > 0).sum())} |")
    lines = ["", "Steering baselines minus each fine-tuned method at its selected alpha, oracle median over all designs, "
             "paired by seed:", "", "| baseline | minus | mean difference | 95% t interval | 95% bootstrap | seeds | "
             "baseline ahead in |", "|---|---|---|---|---|---|---|", *table] if table else [
        "", "No fine-tuned row of these seeds carries a selection score, so the steering baselines are not paired "
        "with a selected alpha here."]
    if "setting" in t.columns:
        lines += ["", "Settings chosen by each baseline's own oracle budget (seed: setting, oracle queries spent):", ""]
        for label in steering:
            rows = t[(t["method"] == label) & t["setting"].notna()].sort_values("seed")
            plain = (rows["selection_rule"] != "valid") if "selection_rule" in rows else [True] * len(rows)
            picks = "; ".join(f"{r.seed}: " + ", ".join(f"{k} {v:g}" for k, v in r.setting.items())
                              + f" ({int(r.setting_queries)}{', by the plain mean' if p else ''})"
                              for r, p in zip(rows.itertuples(), plain))
            lines.append(f"- {label}: {picks or '-'}")
    return lines


def plot(df: pd.DataFrame, path: Path) -> Path:
    """Frontiers, one row per task: oracle median (all designs; invalid ones failing) against the whole path's KL,
    one line per fine-tuned method over alpha; the rows without a KL (Pretrained, Grad., the steering baselines,
    the best offline design) as horizontal lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    tasks = sorted(df["task"].unique())
    fig = Figure(figsize=(13, 3.8 * len(tasks)))
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    flat = {"Pretrained": ("grey", ":"), "Grad. (r_hat)": ("grey", "-."),
            **{b.label: (c, "--") for b, c in zip(BASELINES.values(), ("tab:purple", "tab:brown", "tab:olive"))}}
    for row, task in enumerate(tasks):
        t = df[df["task"] == task]
        for j, (key, title) in enumerate((("median", "all designs"), ("median_penalized", "invalid = worst offline"))):
            ax = axes[row, j]
            if key not in t.columns:
                ax.set_visible(False)
                continue
            for method, g in t[t["alpha"].notna()].groupby("method", sort=False):
                s = g.groupby("alpha").agg(kl=("ft_kl", "mean"), y=(key, "mean"), lo=(key, "min"), hi=(key, "max"))
                ax.errorbar(s["kl"], s["y"], yerr=[s["y"] - s["lo"], s["hi"] - s["y"]], marker="o", capsize=3,
                            label=method)
                for alpha, r in s.iterrows():
                    ax.annotate(f"{alpha:g}", (r["kl"], r["y"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            for name, (color, style) in flat.items():
                ref = t[t["method"] == name]
                if not ref.empty and ref[key].notna().any():
                    ax.axhline(ref[key].mean(), color=color, linestyle=style, label=name)
            ax.axhline(t["best_offline"].mean(), color="crimson", linestyle="--", label="best offline design")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plain)
            lo, hi = ax.get_xlim()
            ax.xaxis.set_minor_formatter(plain if hi / lo < 20 else NullFormatter())  # label minors within a decade
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel("whole-path KL to the pretrained model (nats); point labels: alpha")
            ax.set_ylabel("oracle median")
            ax.set_title(f"{task}, {title} ({t['seed'].nunique()} seeds; bars: range over seeds)", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row, 1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--task", choices=sorted(PRESETS), default="tfbind8")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--alphas", type=float, nargs="+", default=[0.003, 0.03, 0.3])
    r.add_argument("--methods", nargs="*", default=["strl", "braid_boot"],
                   help="fine-tuned methods; none (with --set baselines.methods=[...]) adds only the baselines' rows")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--set", nargs="*", default=[], dest="overrides", help="config key=value overrides for every run")
    r.add_argument("--runs", default=str(ROOT / "runs" / "bench2"),
                   help="where the run directories live (a later run with the same --runs resumes their stages)")
    r.add_argument("--variant", default="", help="a name for these overrides: rows go to <task>-<variant>.jsonl")
    r.add_argument("--share-upstream", default=None, choices=sorted(PRESETS), metavar="TASK",
                   help="copy TASK's finished data, oracle and reward stages of each seed first (the other backbone "
                        "of the same task), so the two backbones' rows pair")
    rs = sub.add_parser("reselect", help="rescore the selection of rows made before the validity-aware rule")
    rs.add_argument("--task", choices=sorted(PRESETS), required=True)
    rs.add_argument("--seeds", type=int, nargs="+", required=True)
    rs.add_argument("--runs", default=str(ROOT / "runs" / "bench2"))
    sub.add_parser("report")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("braid_ray").setLevel(logging.WARNING)
    if args.cmd == "run":
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            run_seed(args.task, seed, args.alphas, args.methods, args.overrides, args.variant, Path(args.runs),
                     args.share_upstream)
        return
    if args.cmd == "reselect":
        log.info("%d rows rescored", reselect(args.task, args.seeds, Path(args.runs)))
        return
    rows = [json.loads(line) for p in sorted(RESULTS.glob("*.jsonl")) for line in p.read_text().splitlines()]
    if not rows:
        raise SystemExit(f"no results in {RESULTS}; run `quality.py run` first")
    df = pd.DataFrame(rows)
    print(report(df))
    print(backbones(df))
    print(f"plot: {plot(df, RESULTS / 'frontier.png')}")


if __name__ == "__main__":
    main()

"""Two oracles on utr_mrl: Optimus 5-Prime (the given one) and a k-mer ridge trained on D_ora (issue 12).

Optimus 5-Prime was trained on the whole Sample et al. 2019 library, so it shares data with the reward (D_off
is part of that library). The k-mer ridge (braid_ray/oracles/kmer.py) is trained on D_ora only and is a linear
model, not a CNN. This scores, with both:

  (a) D_ora's validation rows (the ridge never trained on them; Optimus did) against the measured MRL;
  (b) synthetic hacked designs: homopolymers, (TAA)n, random uniform and T-rich random 50-mers;
  (c) greedy ascent on each oracle from the top rows of D_off (best of K random single mutations per step);
  (d) with --run-dir, every method's designs in that run's eval/samples.parquet (its own D_ora for the ridge).
      The committed results used a short run (its fine-tuned designs stay near the pretrained ones):

    .venv/bin/python launch/finetune.py --config configs/utr_mrl.yaml task.max_rows=40000 \
        run.dir=runs/oracle_agreement/utr40k ray.num_workers=0 reward.members=4 reward.epochs=4 \
        diffusion.epochs=3 finetune.steps=30 eval.n_samples=200 eval.grad_steps=50

    .venv/bin/python benchmarks/oracle_agreement.py --run-dir runs/oracle_agreement/utr40k
    .venv/bin/python benchmarks/oracle_agreement.py --methods-only --run-dir ...   # (d) alone, keeping (a)-(c)

Prints Markdown and writes benchmarks/results/oracle_agreement.{json,md}. The full table's split is cached in
runs/oracle_agreement/full (data stage and the ridge's weights), so a second run skips the fit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from braid_ray.config import load_config
from braid_ray.data.encoding import decode, encode_strings
from braid_ray.eval.stats import pearson, spearman
from braid_ray.oracles import OracleSet, build_oracles
from braid_ray.oracles.kmer import heldout_split
from braid_ray.rundir import RunDir
from braid_ray.stages import data_stage

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "benchmarks" / "results" / "oracle_agreement"
PRESET = ROOT / "configs" / "utr_mrl.yaml"

log = logging.getLogger("oracle_agreement")


def composition(codes: np.ndarray) -> dict:
    return {"T": float((codes == 3).mean()), "A": float((codes == 0).mean()),
            "GC": float(np.isin(codes, (1, 2)).mean())}


def percentile(value: float, reference: np.ndarray) -> float:
    return float(100.0 * np.mean(reference <= value))


def heldout(oracles: OracleSet, d, splits, val_fraction: float, seed: int) -> dict:
    """Both oracles on D_ora's validation rows: all of them and their top 10% by measured y."""
    val, _ = heldout_split(splits.ora.size, val_fraction, seed)
    rows = splits.ora[val]
    y, s = d.y[rows], oracles.score_all(d.codes[rows])
    top = y >= np.quantile(y, 0.9)
    out = {"rows": int(rows.size), "top10_rows": int(top.sum())}
    for part, mask in (("all", np.ones_like(top)), ("top10", top)):
        p, k = s["primary"][mask], s["secondary"][mask]
        out[part] = {"optimus_vs_y": {"pearson": pearson(p, y[mask]), "spearman": spearman(p, y[mask])},
                     "ridge_vs_y": {"pearson": pearson(k, y[mask]), "spearman": spearman(k, y[mask])},
                     "optimus_vs_ridge": {"pearson": pearson(p, k), "spearman": spearman(p, k)}}
    return out, s


def hacked_designs(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    repeat = {"poly-T": "T", "poly-A": "A", "poly-C": "C", "poly-G": "G", "(TAA)n": "TAA", "(TA)n": "TA",
              "(TTC)n": "TTC"}
    out = {name: encode_strings([(unit * length)[:length]]) for name, unit in repeat.items()}
    out["random uniform (1000)"] = rng.integers(0, 4, (1000, length)).astype(np.int8)
    out["random, 50% T (1000)"] = rng.choice(4, size=(1000, length), p=[1 / 6, 1 / 6, 1 / 6, 1 / 2]).astype(np.int8)
    return out


def greedy_ascent(objective, start: np.ndarray, steps: int, proposals: int, seed: int,
                  snapshots: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Each step, each design tries ``proposals`` random single mutations and keeps the best if it improves."""
    rng = np.random.default_rng(seed)
    x = start.copy()
    fx = objective(x)
    n, length = x.shape
    out = {0: x.copy()}
    for step in range(1, steps + 1):
        pos = rng.integers(0, length, (n, proposals))
        shift = rng.integers(1, 4, (n, proposals))
        cand = np.repeat(x[:, None, :], proposals, 1)
        rows, cols = np.arange(n)[:, None], np.arange(proposals)[None, :]
        cand[rows, cols, pos] = (cand[rows, cols, pos] + shift) % 4  # a letter other than the current one
        fc = objective(cand.reshape(n * proposals, length)).reshape(n, proposals)
        best = fc.argmax(1)
        better = fc[np.arange(n), best] > fx
        x[better] = cand[np.arange(n), best][better]
        fx[better] = fc[np.arange(n), best][better]
        if step in snapshots:
            out[step] = x.copy()
            log.info("greedy: step %d/%d, objective mean %.3f", step, steps, fx.mean())
    return out


def describe(oracles: OracleSet, codes: np.ndarray, best: tuple[float, float], start: np.ndarray | None = None) -> dict:
    s = oracles.score_all(codes)
    row = {"n": int(len(codes)), **composition(codes)}
    for key, name, b in (("primary", "optimus", best[0]), ("secondary", "ridge", best[1])):
        v = s[key]
        row[name] = {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max()),
                     "frac_above_best": float((v > b).mean())}
    if len(codes) >= 2:
        row["optimus_vs_ridge"] = {"pearson": pearson(s["primary"], s["secondary"]),
                                   "spearman": spearman(s["primary"], s["secondary"])}
    row["ridge_out_of_range_counts"] = float(oracles.secondary.out_of_range(codes).mean())
    if start is not None:
        row["hamming_from_start"] = float((codes != start).sum(1).mean())
    return row


def method_designs(run_dir: str) -> dict:
    """(d): every method's designs of a finished run, scored by both oracles (the ridge on that run's D_ora)."""
    run = RunDir(run_dir)
    samples = Path(run_dir) / "eval" / "samples.parquet"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples}: run launch/finetune.py with run.dir={run_dir} first")
    cfg = load_config(Path(run_dir) / "data" / "config.yaml", [f"run.dir={run_dir}"])  # the run's resolved config
    data = data_stage(cfg, run)
    oracles = build_oracles(data.task, data.d, data.splits, cfg.oracle, cfg.run.seed, run.stage("oracle"))
    frame = run.stage("eval").read_parquet("samples.parquet")
    codes = {m: encode_strings(g["sequence"].tolist()) for m, g in frame.groupby("method", sort=False)}
    compared = oracles.compare(codes, best_offline_codes=data.d.codes[data.splits.off])
    # The run's own oracle column is Optimus: a check that the two scorings are the same model.
    first = next(iter(codes))
    assert np.allclose(frame[frame["method"] == first]["oracle"].to_numpy(), compared["primary"][first], atol=1e-4)
    comp = {m: composition(c) for m, c in codes.items()}
    settings = {"reward.members": cfg.reward.members, "reward.epochs": cfg.reward.epochs,
                "diffusion.epochs": cfg.diffusion.epochs, "finetune.steps": cfg.finetune.steps,
                "finetune.alpha": cfg.finetune.alpha, "eval.n_samples": cfg.eval.n_samples,
                "eval.grad_steps": cfg.eval.grad_steps, "task.max_rows": cfg.task.max_rows, "run.seed": cfg.run.seed}
    return {"run_dir": run_dir, "run_settings": settings, "rows": data.summary["rows"], "ridge": oracles.secondary.info,
            "heldout_agreement": oracles.heldout, "best_offline": compared["best_offline"],
            "best_offline_measured_y": data.summary["best_offline_y"],
            "agreement": compared["agreement"], "composition": comp}


def markdown(res: dict) -> str:
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    lines = [f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}; {res['seconds']:.0f} s in all.", ""]
    rows = res["full"]["rows"]
    ridge = res["full"]["ridge"]
    lines += ["## (a)-(c) The two oracles on the utr_mrl split",
              "",
              f"D = {rows['D']:,} rows, D_ora = {rows['D_ora']:,}, D_off = {rows['D_off']:,} (seed 0, oracle_fraction "
              f"0.5, q = 0.6). The k-mer ridge: {ridge['width']:,} features, lambda {ridge['lambda']:g} (chosen on "
              f"{ridge['tune_rows']:,} tuning rows), trained on {ridge['train_rows']:,} D_ora rows in "
              f"{ridge['fit_seconds']:.0f} s.", "",
              "### (a) D_ora validation rows (the ridge never trained on them; Optimus did)", "",
              "| rows | Optimus vs y: Pearson / Spearman | ridge vs y: Pearson / Spearman | Optimus vs ridge: Pearson / Spearman |",
              "|---|---|---|---|"]
    h = res["full"]["heldout"]
    for part, label in (("all", f"all {h['rows']:,}"), ("top10", f"top 10% by y ({h['top10_rows']:,})")):
        p = h[part]
        lines.append(f"| {label} | {f(p['optimus_vs_y']['pearson'])} / {f(p['optimus_vs_y']['spearman'])} | "
                     f"{f(p['ridge_vs_y']['pearson'])} / {f(p['ridge_vs_y']['spearman'])} | "
                     f"{f(p['optimus_vs_ridge']['pearson'])} / {f(p['optimus_vs_ridge']['spearman'])} |")
    b = res["full"]["best_offline"]
    lines += ["", f"Best offline design (max over D_off): Optimus {b['optimus']:.3f}, ridge {b['ridge']:.3f}, measured "
              f"{b['measured']:.3f}. Percentiles below are among the D_ora validation rows under the same oracle.", "",
              "### (b) Synthetic hacked designs", "",
              "| design | T share | Optimus | pct | > best offline | ridge | pct | > best offline | ridge, counts unclipped | ridge counts out of range |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["full"]["hacks"].items():
        lines.append(f"| {name} | {r['T']:.2f} | {f(r['optimus']['median'])} | {r['optimus_pct']:.1f} | "
                     f"{r['optimus']['frac_above_best']:.2f} | {f(r['ridge']['median'])} | {r['ridge_pct']:.1f} | "
                     f"{r['ridge']['frac_above_best']:.2f} | {f(r['ridge_unclipped_median'])} | "
                     f"{r['ridge_out_of_range_counts']:.1f} |")
    lines += ["", "Single designs show their score; the random sets (1,000 each) show their median and the share "
              "above the best offline design.", ""]
    for objective, g in res["full"]["greedy"].items():
        lines += [f"### (c) Greedy ascent on {objective}: {g['n']} designs from the top of D_off, {g['proposals']} "
                  "random single mutations per design per step", "",
                  "| step | Optimus mean / max | Optimus > best | ridge mean / max | ridge > best | Optimus vs ridge Spearman | T share | GC share | Hamming from start |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for step, r in g["snapshots"].items():
            lines.append(f"| {step} | {r['optimus']['mean']:.2f} / {r['optimus']['max']:.2f} | "
                         f"{r['optimus']['frac_above_best']:.2f} | {r['ridge']['mean']:.2f} / {r['ridge']['max']:.2f} | "
                         f"{r['ridge']['frac_above_best']:.2f} | {f(r['optimus_vs_ridge']['spearman'])} | "
                         f"{r['T']:.2f} | {r['GC']:.2f} | {r.get('hamming_from_start', 0):.1f} |")
        lines.append("")
    if "methods" in res:
        m = res["methods"]
        a = m["agreement"]
        ridge = m["ridge"]
        lines += [f"## (d) Every method's designs: {m['run_dir']}", ""]
        if "command" in m:
            lines += [f"Command: `{m['command']}` ({m['seconds']:.0f} s)", ""]
        settings = ", ".join(f"{k}={v}" for k, v in m.get("run_settings", {}).items())
        rows_d = ", ".join(f"{k} {v:,}" for k, v in m["rows"].items())
        best_d = m["best_offline"]
        lines += [f"Run settings: {settings}.", "",
                  f"Rows: {rows_d}. The ridge here is trained on this run's D_ora ({ridge['train_rows']:,} rows; "
                  f"held-out Pearson {ridge['heldout_pearson']:.3f}, Spearman {ridge['heldout_spearman']:.3f}). "
                  f"Best offline design: Optimus {best_d['primary']:.3f}, ridge {best_d['secondary']:.3f} "
                  f"(measured {m['best_offline_measured_y']:.3f}).", "",
                  "| method | n | Optimus median | ridge median | Optimus > best | ridge > best | both > best | Pearson | Spearman | T share |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in a["methods"].items():
            lines.append(f"| {name} | {r['n']} | {f(r['primary_median'])} | {f(r['secondary_median'])} | "
                         f"{r['primary_frac_above_best']:.3f} | {r['secondary_frac_above_best']:.3f} | "
                         f"{r['both_frac_above_best']:.3f} | {f(r['pearson'])} | {f(r['spearman'])} | "
                         f"{m['composition'][name]['T']:.2f} |")
        lines += ["", f"Pooled over all designs: Pearson {f(a['pooled']['pearson'])}, Spearman "
                  f"{f(a['pooled']['spearman'])}. Ranking of the methods by median: Spearman "
                  f"{f(a['method_ranking_spearman'])} between the oracles.",
                  f"Order by Optimus: {', '.join(a['order_primary'])}.",
                  f"Order by ridge: {', '.join(a['order_secondary'])}.", ""]
    lines += ["## Reading", "",
              "- Optimus 5-Prime was trained on every row of this library, D_ora's validation rows included, so its "
              "Pearson in (a) is a fit to its training data (its own test split: 0.968, PROVENANCE). The ridge "
              "never saw those rows.",
              "- `ridge counts out of range`: how many k-mer counts of a design lie outside the range seen in "
              "training; the ridge clips them to that range, and the `unclipped` column shows what a plain linear "
              "model would say.",
              "- In (c) one oracle is the objective of a direct search and the other is not: its column shows how "
              "much of the gain a model of another family believes.", ""]
    return "\n".join(lines)


def full_split(args: argparse.Namespace) -> dict:
    """(a)-(c) on the preset's split of the full table (or its first --max-rows rows)."""
    rows = [f"task.max_rows={args.max_rows}"] if args.max_rows else []
    cfg = load_config(PRESET, [f"run.dir={args.full_dir}", "ray.num_workers=0", *rows])
    run = RunDir(cfg.run.dir)
    data = data_stage(cfg, run)
    d, s = data.d, data.splits
    oracles = build_oracles(data.task, d, s, cfg.oracle, cfg.run.seed, run.stage("oracle"))
    full: dict = {"rows": data.summary["rows"], "ridge": oracles.secondary.info}
    full["heldout"], val_scores = heldout(oracles, d, s, cfg.oracle.val_fraction, cfg.run.seed)
    off = oracles.score_all(d.codes[s.off])
    best = (float(off["primary"].max()), float(off["secondary"].max()))
    full["best_offline"] = {"optimus": best[0], "ridge": best[1], "measured": float(d.y[s.off].max())}

    full["hacks"] = {}
    for name, codes in hacked_designs(d.length, cfg.run.seed).items():
        r = describe(oracles, codes, best)
        r["optimus_pct"] = percentile(r["optimus"]["median"], val_scores["primary"])
        r["ridge_pct"] = percentile(r["ridge"]["median"], val_scores["secondary"])
        r["ridge_unclipped_median"] = float(np.median(oracles.secondary.score(codes, clip=False)))
        full["hacks"][name] = r
        log.info("%s: Optimus %.3f, ridge %.3f", name, r["optimus"]["median"], r["ridge"]["median"])

    top = d.codes[s.off[np.argsort(-d.y[s.off], kind="stable")[:args.greedy_n]]]
    snaps = tuple(sorted({0, 25, 50, 100, args.greedy_steps // 2, args.greedy_steps}))
    full["greedy"] = {}
    for label, key in (("Optimus 5-Prime", "primary"), ("the k-mer ridge", "secondary")):
        oracle = getattr(oracles, key)
        t = time.perf_counter()
        path = greedy_ascent(oracle.score, top, args.greedy_steps, args.proposals, cfg.run.seed, snaps)
        full["greedy"][label] = {"n": len(top), "proposals": args.proposals, "steps": args.greedy_steps,
                                 "seconds": round(time.perf_counter() - t, 1),
                                 "snapshots": {step: describe(oracles, x, best, top) for step, x in path.items()},
                                 "final_designs": decode(path[args.greedy_steps])[:5]}
    return full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a finished utr_mrl run whose eval/samples.parquet to score as well")
    parser.add_argument("--full-dir", default=str(ROOT / "runs" / "oracle_agreement" / "full"))
    parser.add_argument("--methods-only", action="store_true",
                        help="score --run-dir's designs and keep parts (a)-(c) from the existing results")
    parser.add_argument("--max-rows", type=int, help="first rows of the table only (a quick check of the script)")
    parser.add_argument("--greedy-n", type=int, default=24, help="designs climbed by greedy ascent")
    parser.add_argument("--greedy-steps", type=int, default=200)
    parser.add_argument("--proposals", type=int, default=16, help="random single mutations tried per design per step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    command = " ".join([".venv/bin/python benchmarks/oracle_agreement.py", *map(shlex.quote, sys.argv[1:])])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads (shared with other jobs)")
    if args.methods_only:
        if not args.run_dir:
            parser.error("--methods-only needs --run-dir")
        res = json.loads(OUT.with_suffix(".json").read_text())
        res["methods"] = method_designs(args.run_dir)
        res["methods"].update({"command": command, "machine": machine,
                               "seconds": round(time.perf_counter() - start, 1)})
    else:
        res = {"command": command, "machine": machine}
        res["full"] = full_split(args)
        if args.run_dir:
            res["methods"] = method_designs(args.run_dir)
        res["seconds"] = time.perf_counter() - start

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    text = "# Oracle agreement on utr_mrl: Optimus 5-Prime vs a k-mer ridge trained on D_ora\n\n" + markdown(res)
    OUT.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

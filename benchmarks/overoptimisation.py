"""Where over-optimisation exists: the exact optimum of each conservative reward on TFBind8 (issue 12, part 5).

With D_off = the 8-mers below the median (the preset), the argmax of r_hat over all 4^8 designs already
scores 0.949 under the exact oracle, so no penalty can beat STRL at the optimum. This benchmark makes the
offline data poorer, so that r_hat can extrapolate wrongly, and measures by enumeration whether r_hat - g_hat
then picks better designs than r_hat. Settings: the quantile q of D_off (``data.quantile``), optionally a
random subsample of D_off of n rows (the reward is built on the subsample; the oracle table stays complete),
optionally measurement noise on D_off's labels (Gaussian, s standard deviations of D_off's y: the reward and the
gradient ascent's starts see the noisy labels; the oracle and the best offline design stay exact), and the PBM
table (``task.path``; the bundled SIX6_REF_R1 by default). A mutational scan (``wt<q>-r<radius>``) replaces the
quantile split by the library a lab has around one known binder: D_off = every 8-mer within Hamming distance r of
a wild type drawn per seed at the q-quantile of y, the case where r_hat must extrapolate from a local library and
can overestimate off it. Per setting and seed:

- the reward ensemble of the tfbind8 preset (``configs/tfbind8.yaml``: members, architecture, epochs, the
  same in every setting) is trained on D_off through the library (``reward_data``, ``train_in_process``,
  ``assemble``: what ``reward_stage`` does, minus its calibration report) and cached in
  ``runs/overopt/<table>-q<q>-seed<s>/``;
- all 65,536 8-mers are scored once per penalty mode; for STRL (none), BRAID-Boot (min), BRAID-Bonus and LCB
  at strengths k in a log grid (g_hat is linear in k, so one pass per mode serves the grid), the rows record
  the oracle score of argmax(r_hat - g_hat), the oracle median of its top 64 and top 640, and their shares
  inside D_off;
- gradient ascent (``braid_ray.baselines.grad``, design-bench's Grad.) from the top of D_off, on r_hat and on
  the bootstrap minimum min_m r_m; the designs are decoded and scored.

Rows are appended to ``benchmarks/results/overoptimisation.jsonl`` one (setting, seed, method, strength) at a
time per finished (setting, seed); rows present are skipped, so a run resumes and more seeds or settings can be
added later. ``report`` writes the paired differences (conservative minus STRL, per seed) with a Student t 95%
interval over seeds (the verdicts; the percentile bootstrap's counts beside them) to ``overoptimisation.md`` and
``overoptimisation.png``.

    .venv/bin/python benchmarks/overoptimisation.py run --seeds 0 1 2 \
        --settings q0.1 q0.2 q0.3 q0.5 q0.5-n5000 q0.5-n1000 q0.5-n1000-s0.5 wt0.7-r2 \
        [--table PATH_TO_UNIPROBE_8MERS.txt]
    .venv/bin/python benchmarks/overoptimisation.py report
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from braid_ray.baselines.grad import gradient_ascent
from braid_ray.config import Config, load_config
from braid_ray.eval.stats import bootstrap_ci, spearman, t_interval
from braid_ray.reward.conservative import ConservativeReward, checkpoint_extra
from braid_ray.reward.fit import assemble, reward_data, score
from braid_ray.rundir import RunDir
from braid_ray.stages import data_stage, oracle_stage, train_in_process

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
JSONL = RESULTS / "overoptimisation.jsonl"
PRESET = ROOT / "configs" / "tfbind8.yaml"
RUNS = ROOT / "runs" / "overopt"
STRENGTHS = (0.01, 0.03, 0.1, 0.3, 1.0)
TOPS = (64, 640)
STRL, BOOT, GRAD, GRAD_MIN = "STRL", "BRAID-Boot", "Grad. (r_hat)", "Grad. (min_m r_m)"
FAMILIES = {"none": STRL, "min": BOOT, "bonus": "BRAID-Bonus", "lcb": "LCB"}

log = logging.getLogger("overoptimisation")


# ------------------------------------------------------------------------------------------------
# Settings and bookkeeping


@dataclass(frozen=True)
class Setting:
    """One way to make the offline data poorer. Either a quantile split (D_off = the 8-mers below the quantile
    of y, ``data.quantile``) or a mutational scan (``radius`` set: D_off = every 8-mer within Hamming distance
    ``radius`` of a wild type drawn at the ``quantile`` of y, the library a lab has around one known binder)."""

    quantile: float  # quantile split: D_off's quantile of y; scan: the wild type's quantile of y
    rows: int | None  # random subsample of D_off the reward is built on; None = all of D_off
    table: str = "SIX6_REF_R1"  # PBM table name (file stem without _8mers)
    noise: float = 0.0  # label noise on D_off: Gaussian, this many standard deviations of D_off's y; 0 = none
    radius: int | None = None  # mutational scan: D_off = the Hamming ball of this radius around the wild type

    @property
    def name(self) -> str:
        head = f"q={self.quantile:g}" if self.radius is None else f"wt={self.quantile:g} r={self.radius}"
        return (f"{self.table} {head}" + (f" n={self.rows}" if self.rows else "")
                + (f" s={self.noise:g}" if self.noise else ""))

    @property
    def short(self) -> str:
        rows = "" if not self.rows else f" n={self.rows // 1000}k" if self.rows % 1000 == 0 else f" n={self.rows}"
        head = f"q{self.quantile:g}" if self.radius is None else f"wt{self.quantile:g} r{self.radius}"
        return f"{head}{rows}" + (f" s={self.noise:g}" if self.noise else "")


def parse_setting(text: str, table: str = "SIX6_REF_R1") -> Setting:
    """``q0.5``, ``q0.5-n1000``, ``q0.5-n1000-s0.5`` or a mutational scan ``wt0.7-r2[-n..][-s..]`` -> Setting;
    anything else is a ValueError naming the expected form."""
    m = re.fullmatch(r"(?:q(0?\.\d+)|wt(0?\.\d+)-r(\d))(?:-n(\d+))?(?:-s(\d*\.?\d+))?", text)
    quantile = None if not m else float(m.group(1) or m.group(2))
    if (not m or not 0 < quantile < 1 or (m.group(3) is not None and not 1 <= int(m.group(3)) <= 7)
            or (m.group(4) is not None and int(m.group(4)) < 10)
            or (m.group(5) is not None and not float(m.group(5)) > 0)):
        raise ValueError(f"setting {text!r}: expected q<quantile in (0, 1)> or wt<wild type's quantile in (0, 1)>"
                         "-r<Hamming radius 1-7>, then [-n<rows >= 10>][-s<label noise > 0, in standard deviations "
                         "of y>], e.g. q0.2, q0.5-n1000, q0.5-n1000-s0.5 or wt0.7-r2")
    return Setting(quantile, int(m.group(4)) if m.group(4) else None, table,
                   float(m.group(5)) if m.group(5) else 0.0, int(m.group(3)) if m.group(3) else None)


def table_name(path: str | None) -> str:
    return "SIX6_REF_R1" if path is None else re.sub(r"_8mers$", "", Path(path).name.split(".")[0])


def methods() -> list[tuple[str, str, float]]:
    """(method, penalty, strength) of every enumerated row, STRL first."""
    out = [(STRL, "none", 0.0), (BOOT, "min", 1.0)]
    out += [(FAMILIES[p], p, k) for p in ("bonus", "lcb") for k in STRENGTHS]
    return out + [(GRAD, "none", 0.0), (GRAD_MIN, "min", 1.0)]


def row_key(row: dict) -> tuple:
    return row["setting"], row["seed"], row["method"], round(float(row["strength"]), 6)


def done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {row_key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def subsample(n: int, rows: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subsample of ``rows`` of n (all n when rows is None or >= n)."""
    if rows is None or rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, rows, 5]).choice(n, size=rows, replace=False))


def noisy_labels(y: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """y plus seeded Gaussian measurement noise of ``noise`` standard deviations of y (y itself when noise is 0)."""
    if noise == 0:
        return y
    rng = np.random.default_rng([seed, len(y), round(noise * 1000), 7])
    return y + noise * float(y.std()) * rng.standard_normal(len(y))


def all_8mers() -> np.ndarray:
    """All 65,536 8-mers as codes (65536, 8); row i is the 8-mer whose base-4 number is i."""
    return np.array(list(itertools.product(range(4), repeat=8)), dtype=np.int8)


def base4_index(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.int64) @ 4 ** np.arange(codes.shape[1] - 1, -1, -1)


def design_metrics(objective: np.ndarray, y: np.ndarray, in_off: np.ndarray, tops: tuple[int, ...] = TOPS) -> dict:
    """What maximising ``objective`` (N,) over every design buys under the oracle ``y`` (N,).

    Ties are broken by design index (stable sort), so equal objectives give the same designs.
    """
    order = np.argsort(-objective, kind="stable")
    out = {"argmax_oracle": float(y[order[0]]), "argmax_in_off": bool(in_off[order[0]]),
           "spearman_all": spearman(objective, y)}
    for k in tops:
        out[f"top{k}_median"] = float(np.median(y[order[:k]]))
        out[f"top{k}_share_in_off"] = float(in_off[order[:k]].mean())
    return out


def design_set_metrics(codes: np.ndarray, y: np.ndarray, in_off: np.ndarray, best_offline: float) -> dict:
    """Oracle summary of a set of designed codes (n, 8) (gradient ascent's), by base-4 look-up."""
    idx = base4_index(codes)
    s = y[idx]
    return {"grad_median": float(np.median(s)), "grad_mean": float(s.mean()), "grad_max": float(s.max()),
            "grad_distinct": int(np.unique(idx).size), "grad_share_in_off": float(in_off[idx].mean()),
            "grad_frac_above_best": float((s > best_offline).mean())}


class PenalisedObjective:
    """A ConservativeReward seen as one reward, r_hat - g_hat under a fixed penalty, for code that asks for
    ``penalty="none"`` (gradient ascent): returns (r_hat - g_hat, 0)."""

    def __init__(self, reward: ConservativeReward, penalty: str):
        self.reward, self.penalty, self.stats = reward, penalty, reward.stats

    def __call__(self, x: torch.Tensor, penalty: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        r_hat, g_hat = self.reward(x, self.penalty)
        objective = r_hat - g_hat
        return objective, torch.zeros_like(objective)


# ------------------------------------------------------------------------------------------------
# One (setting, seed)


def config(setting: Setting, seed: int, table: str | None) -> Config:
    if setting.radius is None:
        run_dir = RUNS / f"{setting.table}-q{setting.quantile:g}-seed{seed}"
        overrides = [f"run.dir={run_dir}", f"run.seed={seed}", f"data.quantile={setting.quantile}"]
    else:  # the product's mutational scan: data.quantile places the wild type
        run_dir = RUNS / f"{setting.table}-wt{setting.quantile:g}-r{setting.radius}-seed{seed}"
        overrides = [f"run.dir={run_dir}", f"run.seed={seed}", f"data.quantile={setting.quantile}",
                     f"data.scan_radius={setting.radius}"]
    if table is not None:
        overrides.append(f"task.path={table}")
    return load_config(PRESET, overrides)


def fit_reward(cfg: Config, codes_off: np.ndarray, y_off: np.ndarray,
               rows: int | None, noise: float = 0.0) -> tuple[ConservativeReward, dict]:
    """The preset's ensemble on (a subsample of) D_off with the labels given (noisy ones when the setting adds
    noise), cached in the run directory; the reward and its record."""
    record = {"reward": cfg.section("reward")["reward"], "rows": rows, "n_off": int(len(codes_off)),
              "y_off_sum": round(float(y_off.sum()), 6), "seed": cfg.run.seed}
    noisy = f"-s{noise:g}" if noise else ""
    path = Path(cfg.run.dir) / f"reward-{'all' if rows is None else rows}{noisy}.safetensors"
    if path.is_file():
        blob = path.read_bytes()
        extra = checkpoint_extra(blob)
        if extra.get("record") == record:
            log.info("reusing %s", path)
            return ConservativeReward.from_bytes(blob), extra
    rd = reward_data(codes_off, y_off, cfg.reward.holdout_fraction, cfg.run.seed)
    start = time.perf_counter()
    net, members = train_in_process(cfg, rd)
    reward = assemble(net, rd, cfg.reward)
    extra = {"record": record, "train_seconds": time.perf_counter() - start, "members": members}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(reward.to_bytes(extra))
    return reward, extra


def run_one(setting: Setting, seed: int, table: str | None, todo: set[tuple], out: Path) -> int:
    """Train, enumerate and append the missing rows of one (setting, seed); returns the rows written."""
    cfg = config(setting, seed, table)
    run = RunDir(cfg.run.dir)
    data = data_stage(cfg, run)
    y = oracle_stage(cfg, run, data).score(all_8mers())
    pool = data.splits.off  # the rows below the quantile, or the scan's ball
    scan = {} if setting.radius is None else {"radius": setting.radius, "wild_type": data.summary["wild_type"],
                                              "wild_type_y": float(data.d.y[data.splits.wild_type])}
    off = pool[subsample(pool.size, setting.rows, seed)]
    codes_off, y_off = data.d.codes[off], data.d.y[off]
    y_seen = noisy_labels(y_off, setting.noise, seed)  # what the reward and Grad.'s starts see; the oracle stays exact
    in_off = np.zeros(4**8, dtype=bool)
    in_off[base4_index(codes_off)] = True  # the labelled rows the method sees (the subsample, when there is one)
    below_q = np.zeros(4**8, dtype=bool)  # the pool D_off was drawn from: below the quantile, or the scan's ball
    below_q[base4_index(data.d.codes[pool])] = True
    best_offline = float(y_off.max())

    start = time.perf_counter()
    reward, extra = fit_reward(cfg, codes_off, y_seen, setting.rows, setting.noise)
    members = extra["members"]
    common = {"setting": setting.name, "short": setting.short, "table": setting.table, "quantile": setting.quantile,
              "rows": setting.rows, "noise": setting.noise, "seed": seed, "n_off": int(len(off)),
              "n_below_q": int(pool.size), **scan,
              "threshold": float(data.splits.threshold), "best_offline_y": best_offline, "oracle_max": float(y.max()),
              "best_measured_y": float(y_off[np.argmax(y_seen)]),  # the oracle's y of the row measured best
              "reward_train_s": round(float(extra["train_seconds"]), 1),
              "member_epochs": float(np.mean([m["epochs_run"] for m in members])),
              "member_oob_rmse": float(np.mean([m["oob_rmse_std_units"] for m in members]))}
    log.info("%s seed %d: reward on %d rows ready in %.0f s (best offline y %.3f)", setting.name, seed, len(off),
             time.perf_counter() - start, best_offline)

    codes = all_8mers()
    scored = {p: score(reward.with_penalty(p, 1.0), codes, p) for p in ("none", "min", "bonus", "lcb")}
    r_hat = scored["none"][0]
    rows = []
    for method, penalty, strength in methods():
        key = (setting.name, seed, method, round(strength, 6))
        if key not in todo:
            continue
        t0 = time.perf_counter()
        row = {**common, "method": method, "penalty": penalty, "strength": strength}
        if method in (GRAD, GRAD_MIN):
            start_codes = codes_off[np.argsort(-y_seen, kind="stable")[:cfg.eval.n_samples]]
            designs = gradient_ascent(PenalisedObjective(reward, penalty), start_codes, cfg.eval.grad_steps,
                                      cfg.eval.grad_lr)
            row |= {"kind": "grad", "n_start": int(len(start_codes)),
                    **design_set_metrics(designs, y, in_off, best_offline)}
        else:
            r, g1 = scored[penalty]
            objective = r - (strength if penalty in ("bonus", "lcb") else 1.0) * g1  # g_hat is linear in k
            m = design_metrics(objective, y, in_off)
            top = np.argsort(-objective, kind="stable")[:TOPS[-1]]
            row |= {"kind": "enumerate", **m, "argmax_r_hat": float(r_hat[top[0]]),
                    "top640_share_below_q": float(below_q[top].mean()),
                    "top640_mean_r_hat_minus_oracle": float((r_hat[top] - y[top]).mean())}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    log.info("%s seed %d: %d rows in %.0f s; STRL argmax %.3f, Boot argmax %.3f", setting.name, seed, len(rows),
             time.perf_counter() - start, *[r.get("argmax_oracle", float("nan")) for r in rows[:2]])
    return len(rows)


def run(settings: list[Setting], seeds: list[int], table: str | None, out: Path = JSONL) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed-major: an interrupted grid still has whole seeds across every setting
        for setting in settings:
            done = done_keys(out)
            todo = {(setting.name, seed, m, round(k, 6)) for m, _, k in methods()} - done
            if not todo:
                log.info("%s seed %d: done, skipped", setting.name, seed)
                continue
            run_one(setting, seed, table, todo, out)


# ------------------------------------------------------------------------------------------------
# Report


def load_rows(path: Path = JSONL) -> pd.DataFrame:
    df = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return df.drop_duplicates(subset=["setting", "seed", "method", "strength"], keep="last")


def _label(method: str, strength: float) -> str:
    return f"{method} (k={strength:g})" if method in ("BRAID-Bonus", "LCB") else method


def paired(df: pd.DataFrame, metric: str, base: str = STRL) -> pd.DataFrame:
    """Per (setting, method, strength, seed): ``metric`` of the method minus that of ``base`` on the same seed."""
    df = df[df[metric].notna()] if metric in df else df.iloc[:0]
    ref = df[df["method"] == base].set_index(["setting", "seed"])[metric]
    other = df[df["method"] != base].copy()
    other["base"] = [ref.get((s, seed), np.nan) for s, seed in zip(other["setting"], other["seed"])]
    other["diff"] = other[metric] - other["base"]
    return other[other["diff"].notna()]


def setting_order(df: pd.DataFrame) -> list[str]:
    first = df.drop_duplicates("setting").copy()
    first["n"] = first["rows"].fillna(10**9)
    first["s"] = first["noise"].fillna(0.0) if "noise" in first else 0.0
    first["r"] = first["radius"].fillna(0) if "radius" in first else 0  # quantile splits first, then the scans
    return first.sort_values(["table", "r", "quantile", "n", "s"],
                             ascending=[True, True, True, False, True])["setting"].tolist()


def diff_summary(p: pd.DataFrame) -> pd.DataFrame:
    """Mean paired difference, its 95% Student t interval over seeds (lo, hi; the verdicts) and percentile
    bootstrap interval (boot_lo, boot_hi; narrower over 10 seeds), and wins / ties / losses, per setting x method."""
    out = []
    for (setting, method, strength), g in p.groupby(["setting", "method", "strength"], sort=False):
        d = g["diff"].to_numpy()
        (lo, hi), (boot_lo, boot_hi) = t_interval(d), bootstrap_ci(d)
        out.append({"setting": setting, "method": method, "strength": strength, "label": _label(method, strength),
                    "mean": d.mean(), "lo": lo, "hi": hi, "boot_lo": boot_lo, "boot_hi": boot_hi,
                    "seeds": len(g), "wins": int((g["diff"] > 1e-12).sum()),
                    "ties": int((g["diff"].abs() <= 1e-12).sum()), "losses": int((g["diff"] < -1e-12).sum())})
    return pd.DataFrame(out)


def _cell(r: pd.Series) -> str:
    sure = r["seeds"] >= 3  # a CI over fewer seeds says nothing
    mark = " **+**" if sure and r["lo"] > 0 else " **-**" if sure and r["hi"] < 0 else ""
    return f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] {r['wins']}/{r['ties']}/{r['losses']}{mark}"


def _verdict(lo: pd.Series, hi: pd.Series) -> str:
    """How many intervals lie above 0 / straddle 0 / lie below 0."""
    return f"{int((lo > 0).sum())} / {int(((lo <= 0) & (hi >= 0)).sum())} / {int((hi < 0).sum())}"


def _pm(x: pd.Series) -> str:
    return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"


def headers(df: pd.DataFrame, order: list[str]) -> list[str]:
    """Column names for the settings: short ones, with the table's name when there are several tables."""
    first = df.drop_duplicates("setting").set_index("setting")
    several = first["table"].nunique() > 1
    return [f"{first.loc[t, 'table']} {first.loc[t, 'short']}" if several else first.loc[t, "short"] for t in order]


def diff_table(s: pd.DataFrame, order: list[str], labels: list[str], names: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(order)]
    for label in labels:
        cells = []
        for setting in order:
            r = s[(s["label"] == label) & (s["setting"] == setting)]
            cells.append(_cell(r.iloc[0]) if len(r) else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def report(df: pd.DataFrame, command: str) -> str:
    order = setting_order(df)
    names = headers(df, order)
    enum = df[df["kind"] == "enumerate"]
    labels = [_label(m, k) for m, p, k in methods() if m not in (STRL, GRAD, GRAD_MIN)]
    seeds = sorted(df["seed"].unique())
    lines = [f"Command: `{command}`", "",
             f"Seeds: {', '.join(map(str, seeds))}. Exact oracle: the PBM table (every 8-mer). The reward ensemble is "
             "the tfbind8 preset's (8 bootstrap members, spectral norm, early stopping), the same in every setting. "
             "Paired difference = method minus STRL on the same seed's ensemble; [lo, hi] = Student t 95% "
             "interval of the mean over seeds (n - 1 degrees of freedom; the percentile bootstrap over 10 seeds is "
             "narrower, and the verdict table counts both; 11 methods x 3 metrics x each setting are tested, "
             "so a single mark is weak evidence); W/T/L = seeds where the method's value is above / equal to / "
             "below STRL's (a W or L "
             "shown as +0.000 / -0.000 is a difference below 0.0005); **+** / **-** = CI entirely above / below 0 "
             "(marked only with >= 3 seeds). Settings: q = D_off's quantile of y; wt r = a mutational scan, D_off = "
             "every 8-mer within Hamming distance r of a wild type drawn (per seed) at the wt-quantile of y; n = "
             "D_off subsampled to n rows; s = Gaussian noise of s standard deviations of y on D_off's labels (the "
             "oracle stays exact).",
             ""]

    lines += ["### The settings and STRL's optimum", "",
              "| setting | seeds | D_off rows | wild type y | best offline y | STRL: oracle of argmax r_hat | "
              "STRL: top-64 median | "
              "STRL: top-640 median | seeds with STRL's argmax / top-64 median below the best offline y | "
              "Spearman(r_hat, y), all 8-mers | mean r_hat - y over STRL's top 640 | member epochs | "
              "Grad. (r_hat) median |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in order:
        g = df[df["setting"] == setting]
        s = g[g["method"] == STRL]
        gr = g[g["method"] == GRAD]
        bad = (f"{int((s['argmax_oracle'] < s['best_offline_y']).sum())} / "
               f"{int((s['top64_median'] < s['best_offline_y']).sum())} of {len(s)}")
        wild = _pm(s["wild_type_y"]) if "wild_type_y" in s and s["wild_type_y"].notna().all() else "-"
        lines.append(f"| {setting} | {len(s)} | {int(s['n_off'].iloc[0])} | {wild} | {_pm(s['best_offline_y'])} | "
                     f"{_pm(s['argmax_oracle'])} | "
                     f"{_pm(s['top64_median'])} | {_pm(s['top640_median'])} | {bad} | "
                     f"{_pm(s['spearman_all'])} | {s['top640_mean_r_hat_minus_oracle'].mean():+.3f} | "
                     f"{s['member_epochs'].mean():.1f} | "
                     f"{_pm(gr['grad_median']) if len(gr) else '-'} |")

    for metric, title in (("argmax_oracle", "oracle score of argmax(r_hat - g_hat)"),
                          ("top64_median", "oracle median of the top 64 of r_hat - g_hat"),
                          ("top640_median", "oracle median of the top 640 of r_hat - g_hat")):
        s = diff_summary(paired(enum, metric))
        lines += ["", f"### Paired difference, {title} (method minus STRL): mean [95% CI] W/T/L", ""]
        lines += diff_table(s, order, labels, names)

    lines += ["", "### Share of the top 64 inside D_off (mean over seeds)", "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(order)]
    for m, p, k in methods():
        if m in (GRAD, GRAD_MIN):
            continue
        g = enum[(enum["method"] == m) & (enum["strength"] == k)]
        cells = [f"{g[g['setting'] == s]['top64_share_in_off'].mean():.2f}" if (g["setting"] == s).any() else "-"
                 for s in order]
        lines.append(f"| {_label(m, k)} | " + " | ".join(cells) + " |")

    grad = df[df["kind"] == "grad"]
    if len(grad):
        lines += ["", "### Gradient ascent from the top of D_off (640 starts, the eval preset's steps and lr)", "",
                  "| setting | Grad. (r_hat) median | Grad. (min_m r_m) median | paired difference (min minus r_hat) "
                  "| distinct designs (r_hat / min) | share in D_off (r_hat / min) |", "|---|---|---|---|---|---|"]
        for setting in order:
            a = grad[(grad["setting"] == setting) & (grad["method"] == GRAD)].set_index("seed")
            b = grad[(grad["setting"] == setting) & (grad["method"] == GRAD_MIN)].set_index("seed")
            both = a.index.intersection(b.index)
            if not len(both):
                continue
            d = b.loc[both, "grad_median"] - a.loc[both, "grad_median"]
            mean, (lo, hi) = d.mean(), t_interval(d.to_numpy())
            w, t, l_ = int((d > 1e-12).sum()), int((d.abs() <= 1e-12).sum()), int((d < -1e-12).sum())
            lines.append(f"| {setting} | {_pm(a['grad_median'])} | {_pm(b['grad_median'])} | "
                         f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] {w}/{t}/{l_} | "
                         f"{a['grad_distinct'].mean():.0f} / {b['grad_distinct'].mean():.0f} | "
                         f"{a['grad_share_in_off'].mean():.2f} / {b['grad_share_in_off'].mean():.2f} |")

    lines += ["", "### Verdict per method: settings where the mean paired difference's CI lies above 0 / "
              "straddles 0 / lies below 0 (t interval; the percentile bootstrap's counts in brackets)", "",
              "| method | argmax | top-64 median | top-640 median |", "|---|---|---|---|"]
    sums = {metric: diff_summary(paired(enum, metric)) for metric in ("argmax_oracle", "top64_median", "top640_median")}
    for label in labels:
        cells = []
        for metric in sums:
            s = sums[metric][sums[metric]["label"] == label]
            cells.append(f"{_verdict(s['lo'], s['hi'])} ({_verdict(s['boot_lo'], s['boot_hi'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame, path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    order = setting_order(df)
    shorts = dict(zip(df["setting"], df["short"]))
    enum = df[df["kind"] == "enumerate"]
    grad = df[df["kind"] == "grad"].copy()
    panels = [("BRAID-Boot (min_m r_m)", ["BRAID-Boot"]), ("BRAID-Bonus", ["BRAID-Bonus"]), ("LCB", ["LCB"])]
    metrics = [("argmax_oracle", "oracle of argmax(r_hat - g_hat)\nminus STRL's"),
               ("top64_median", "oracle median of the top 64\nminus STRL's")]
    width = max(4.6, 0.36 * len(order))  # per panel: room for every setting's tick label
    fig = Figure(figsize=(width * (len(panels) + 1), 7.8))
    axes = fig.subplots(len(metrics), len(panels) + 1, squeeze=False)
    x = np.arange(len(order))
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(STRENGTHS)))
    for row, (metric, ylabel) in enumerate(metrics):
        s = diff_summary(paired(enum, metric))
        p = paired(enum, metric)
        lims: list[tuple[float, float]] = []
        for col, (title, names) in enumerate(panels):
            ax = axes[row, col]
            sub = s[s["method"].isin(names)]
            strengths = sorted(sub["strength"].unique())
            for j, k in enumerate(strengths):
                c = sub[sub["strength"] == k].set_index("setting").reindex(order)
                dx = (j - (len(strengths) - 1) / 2) * 0.12
                colour = "black" if len(strengths) == 1 else colours[list(STRENGTHS).index(k)]
                pts = p[p["method"].isin(names) & (p["strength"] == k)]
                ax.scatter([order.index(t) + dx for t in pts["setting"]], pts["diff"], s=9, color=colour, alpha=0.35)
                ax.errorbar(x + dx, c["mean"], yerr=[c["mean"] - c["lo"], c["hi"] - c["mean"]], fmt="o", ms=4,
                            capsize=2, color=colour, label=None if len(strengths) == 1 else f"k={k:g}")
            ax.axhline(0, color="crimson", lw=1)
            lims.append(ax.get_ylim())
            ax.set_title(title if row == 0 else "")
            if col == 0:
                ax.set_ylabel(ylabel)
            if len(strengths) > 1 and row == 0:
                ax.legend(fontsize=7, frameon=False, ncol=2)
        for ax in axes[row, :len(panels)]:  # one scale for the three penalties of a row
            ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
        ax = axes[row, -1]
        if row == 0 and len(grad):
            a = grad[grad["method"] == GRAD].set_index(["setting", "seed"])["grad_median"]
            b = grad[grad["method"] == GRAD_MIN].set_index(["setting", "seed"])["grad_median"]
            d = (b - a).dropna().reset_index()
            d.columns = ["setting", "seed", "diff"]
            for i, t in enumerate(order):
                v = d[d["setting"] == t]["diff"].to_numpy()
                if v.size:
                    mean, (lo, hi) = v.mean(), t_interval(v)
                    ax.scatter(np.full(v.size, i), v, s=9, color="black", alpha=0.35)
                    ax.errorbar([i], [mean], yerr=[[mean - lo], [hi - mean]], fmt="s", ms=4, capsize=2, color="black")
            ax.axhline(0, color="crimson", lw=1)
            ax.set_title("Grad. on min_m r_m minus Grad. on r_hat\n(oracle median of 640 designs)")
        elif row == 1:
            strl = enum[enum["method"] == STRL]
            for name, column, style in (("STRL argmax", "argmax_oracle", "o"),
                                        ("STRL top-64 median", "top64_median", "s"),
                                        ("best offline y", "best_offline_y", "_")):
                m = strl.groupby("setting")[column].mean().reindex(order)
                # absolute levels, for reading the differences
                ax.plot(x, m.to_numpy(), style, ms=12 if style == "_" else 6, mew=2, label=name)
            ax.set_title("absolute levels (mean over seeds)")
            ax.legend(fontsize=7, frameon=False)
            ax.tick_params(labelleft=True)
            ax.set_ylim(0, 1.05)
        for ax in axes[row]:
            ax.set_xticks(x, [shorts[t] for t in order], rotation=60, ha="right", fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("TFBind8 by enumeration: conservative reward minus STRL, per setting (dots: seeds; "
                 "bars: Student t 95% interval of the mean over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--settings", nargs="+", default=["q0.1", "q0.2", "q0.3", "q0.5", "q0.5-n5000", "q0.5-n1000"])
    r.add_argument("--table", default=None, help="a UniPROBE 8-mer table (task.path); default: the bundled SIX6")
    r.add_argument("--threads", type=int, default=1)
    rep = sub.add_parser("report")
    rep.add_argument("--command", default="see benchmarks/overoptimisation.py's docstring",
                     help="the command that produced the rows, for the top of the Markdown")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    if args.cmd == "run":
        torch.set_num_threads(args.threads)
        table = str(Path(args.table).resolve()) if args.table else None
        run([parse_setting(s, table_name(table)) for s in args.settings], args.seeds, table)
    else:
        df = load_rows()
        text = report(df, args.command)
        (RESULTS / "overoptimisation.md").write_text(text)
        print(text)
        print(f"plot: {plot(df, RESULTS / 'overoptimisation.png')}")


if __name__ == "__main__":
    main()

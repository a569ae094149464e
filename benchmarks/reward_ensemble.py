"""Reward ensemble: cost of stacking, Ray Train against in-process, and which penalty earns its name.

    .venv/bin/python benchmarks/reward_ensemble.py                  # both parts; the speed part alone takes about 3 minutes on 2 cores
    .venv/bin/python benchmarks/reward_ensemble.py --part speed     # timing only

Prints Markdown and writes benchmarks/results/reward_ensemble.json. Timings are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Before numpy and torch are imported, which read the thread count once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import numpy as np
import torch

from braid_ray.config import load_config
from braid_ray.data.splits import offline_splits
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import get_task
from braid_ray.reward.fit import assemble, calibration, reward_data, stack_spec, train_spec
from braid_ray.reward.train import train_members
from braid_ray.stages import DataResult, calibration_sets

OUT = Path(__file__).resolve().parent / "results" / "reward_ensemble.json"


def _tfbind8(seed: int = 0) -> tuple[DataResult, object]:
    cfg = load_config(None, [f"run.seed={seed}"])
    task = get_task(cfg.task)
    d: Labelled = task.load()
    splits = offline_splits(d, 0.0, 0.5, seed)
    return DataResult(task, d, splits, {}, "bench"), cfg


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(data: DataResult, cfg) -> dict:
    """Fixed work (3 epochs, no early stop) so that times compare like for like."""
    s = data.splits
    rd = reward_data(data.d.codes[s.off], data.d.y[s.off], cfg.reward.holdout_fraction, 0)
    fixed = load_config(None, ["reward.epochs=3", "reward.patience=100"])
    spec, train = stack_spec(fixed.reward, 8), train_spec(fixed.reward)
    torch.set_num_threads(1)
    one = _timed(lambda: train_members(rd.codes, rd.z, [0], spec, train, 0, progress=False))
    eight = _timed(lambda: train_members(rd.codes, rd.z, list(range(8)), spec, train, 0, progress=False))
    seq = _timed(lambda: [train_members(rd.codes, rd.z, [m], spec, train, 0, progress=False) for m in range(8)])
    torch.set_num_threads(2)
    eight_2t = _timed(lambda: train_members(rd.codes, rd.z, list(range(8)), spec, train, 0, progress=False))
    torch.set_num_threads(1)

    import ray

    from braid_ray.distributed.cluster import WORKER_ENV
    from braid_ray.distributed.reward import train_ensemble

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    ray_cfg = load_config(None, ["reward.epochs=3", "reward.patience=100", "ray.num_workers=2"])
    storage = "/tmp/braid_bench_ray"
    ray_time = _timed(lambda: train_ensemble(ray_cfg, rd, storage, name=f"bench-{time.time_ns()}"))
    default_cfg = load_config(None, ["ray.num_workers=2"])
    full_ray = _timed(lambda: train_ensemble(default_cfg, rd, storage, name=f"bench-full-{time.time_ns()}"))
    ray.shutdown()
    return {"rows": int(len(rd.codes)), "epochs": 3, "one_member_s": one, "eight_stacked_s": eight,
            "eight_sequential_s": seq, "eight_stacked_2_threads_s": eight_2t, "ray_2_workers_s": ray_time,
            "default_ensemble_on_ray_s": full_ray}


VARIANTS = {
    "same-architecture, spectral norm (default)": [],
    "same-architecture, plain (paper's BRAID-Boot)": ["reward.spectral_norm=false"],
    "diverse architectures, plain": ["reward.diverse=true", "reward.spectral_norm=false"],
    "diverse architectures, spectral norm": ["reward.diverse=true"],
}


def quality(data: DataResult, seeds: tuple[int, ...] = (0, 1)) -> dict:
    torch.set_num_threads(2)
    out = {}
    for name, overrides in VARIANTS.items():
        reports = []
        for seed in seeds:
            data_s, _ = _tfbind8(seed) if seed else (data, None)
            cfg = load_config(None, [f"run.seed={seed}", *overrides])
            s = data_s.splits
            rd = reward_data(data_s.d.codes[s.off], data_s.d.y[s.off], cfg.reward.holdout_fraction, seed)
            net, _ = train_members(rd.codes, rd.z, list(range(cfg.reward.members)), stack_spec(cfg.reward, 8),
                                   train_spec(cfg.reward), seed, progress=False)
            reward = assemble(net, rd, cfg.reward)
            reports.append(calibration(reward, calibration_sets(data_s, rd), data_s.d.codes[s.off][rd.holdout][:1000],
                                       seed))
        out[name] = reports
        print(f"  {name}: done", file=sys.stderr)
    return out


def markdown(result: dict) -> str:
    lines = []
    if "speed" in result:
        sp = result["speed"]
        lines += [f"Reward ensemble cost on TFBind8 D_off ({sp['rows']:,} training rows, {sp['epochs']} epochs "
                  "each, no early stop; default member architecture):", "",
                  "| what | seconds | ratio |", "|---|---|---|",
                  f"| 1 member, 1 thread | {sp['one_member_s']:.1f} | 1.00 |",
                  f"| 8 members stacked, 1 thread | {sp['eight_stacked_s']:.1f} | "
                  f"{sp['eight_stacked_s'] / sp['one_member_s']:.2f} (target <= 2) |",
                  f"| 8 members one after another, 1 thread | {sp['eight_sequential_s']:.1f} | "
                  f"{sp['eight_sequential_s'] / sp['one_member_s']:.2f} |",
                  f"| 8 members stacked, 2 threads | {sp['eight_stacked_2_threads_s']:.1f} | "
                  f"{sp['eight_stacked_2_threads_s'] / sp['one_member_s']:.2f} |",
                  f"| 8 members on Ray Train, 2 workers x 0.5 CPU, 1 thread each (Ray started before) | "
                  f"{sp['ray_2_workers_s']:.1f} | {sp['ray_2_workers_s'] / sp['eight_stacked_s']:.2f} of in-process "
                  "1 thread (target <= 1.2) |",
                  f"| default M=8 ensemble with early stopping, Ray Train 2 workers | "
                  f"{sp['default_ensemble_on_ray_s']:.1f} | target <= 60 s |", ""]
    if "quality" in result:
        keys = [("in", "rmse", "RMSE in"), ("top_half", "spearman", "Spearman top half"),
                ("top_1pct", "spearman", "Spearman top 1%")]
        lines += ["Calibration on TFBind8 (D_off = below the median; mean over seeds "
                  f"{len(next(iter(result['quality'].values())))}; g ratio = mean g_hat out of distribution / on "
                  "held-out D_off rows; targets for the default: top half >= 1.5, top 1% >= 2.5, "
                  "Spearman(g, abs err) >= 0.4):", "",
                  "| ensemble | penalty | " + " | ".join(k[2] for k in keys)
                  + " | g ratio top half | g ratio top 1% | Spearman(g, abs err) | g_hat at t=1 / t=0 (relaxed) |",
                  "|---|---|" + "---|" * (len(keys) + 4)]
        for name, reports in result["quality"].items():
            for penalty in ("min", "lcb", "bonus"):
                def mean(get) -> float:
                    return float(np.mean([get(r[penalty]) for r in reports]))
                cells = [mean(lambda r, s=s, m=m: r[s][m]) for s, m, _ in keys]
                relaxed = mean(lambda r: r["relaxed_inputs"]["t=1.0"]["mean_g_hat"]
                               / max(r["relaxed_inputs"]["t=0.0"]["mean_g_hat"], 1e-12))
                lines.append(f"| {name} | {penalty} | " + " | ".join(f"{c:.3f}" for c in cells)
                             + f" | {mean(lambda r: r['ratio_g_out_in']['top_half']):.2f}"
                             + f" | {mean(lambda r: r['ratio_g_out_in']['top_1pct']):.2f}"
                             + f" | {mean(lambda r: r['spearman_g_abs_err']):.2f} | {relaxed:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    args = parser.parse_args()
    data, cfg = _tfbind8()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                    "command": "python benchmarks/reward_ensemble.py --part " + args.part}
    if args.part in ("speed", "all"):
        result["speed"] = speed(data, cfg)
    if args.part in ("quality", "all"):
        result["quality"] = quality(data)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()

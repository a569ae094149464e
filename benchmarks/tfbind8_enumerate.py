"""What each conservative reward rewards on TFBind8, by enumeration of all 4^8 = 65,536 8-mers (issue 4).

A fine-tuned generator can at best put its mass on the maximisers of its objective's reward term. On TFBind8
every design can be scored, so for each penalty the exact optimum of r_hat - g_hat is known: the oracle
score of its argmax and the oracle median of its top 64 and top 640 designs. Comparing these with what
fine-tuning reached (benchmarks/quality.py) separates a reward that points the wrong way from an optimiser
that fails to follow it.

    .venv/bin/python benchmarks/tfbind8_enumerate.py          # after `quality.py run --task tfbind8`

It reads the reward ensembles of the quality benchmark's run directories (runs/bench/tfbind8-seed<s>) and
writes benchmarks/results/tfbind8_enumerate.json.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from braid_ray.config import load_config
from braid_ray.finetune.run import load_reward
from braid_ray.reward.fit import score
from braid_ray.rundir import RunDir
from braid_ray.stages import data_stage, oracle_stage

ROOT = Path(__file__).resolve().parents[1]

PENALTIES = (("STRL", "none", 0.0), ("BRAID-Boot", "min", 1.0), ("BRAID-Bonus (k=0.3)", "bonus", 0.3),
             ("BRAID-Bonus (k=1)", "bonus", 1.0))


def enumerate_seed(seed: int) -> list[dict]:
    run_dir = ROOT / "runs" / "bench" / f"tfbind8-seed{seed}"
    if not (run_dir / "reward" / "reward.safetensors").is_file():
        raise SystemExit(f"{run_dir}: no reward ensemble; run "
                         f"`benchmarks/quality.py run --task tfbind8 --seeds {seed}` first")
    cfg = load_config(ROOT / "configs" / "tfbind8.yaml", [f"run.dir={run_dir}", f"run.seed={seed}"])
    run = RunDir(cfg.run.dir)
    data = data_stage(cfg, run)
    oracle = oracle_stage(cfg, run, data)
    codes = np.array(list(itertools.product(range(4), repeat=8)), dtype=np.int8)
    y = oracle.score(codes)
    in_off = np.zeros(len(codes), dtype=bool)
    in_off[data.d.codes[data.splits.off] @ 4 ** np.arange(7, -1, -1)] = True  # row i of codes is 8-mer i in base 4
    rows = []
    for label, penalty, strength in PENALTIES:
        r, g = score(load_reward(str(run_dir), penalty, strength), codes, penalty)
        top = np.argsort(-(r - g), kind="stable")
        rows.append({"seed": seed, "method": label, "argmax_oracle": float(y[top[0]]),
                     "top64_oracle_median": float(np.median(y[top[:64]])),
                     "top640_oracle_median": float(np.median(y[top[:640]])),
                     "top640_share_in_d_off": float(in_off[top[:640]].mean())})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    rows = [row for seed in (0, 1, 2) for row in enumerate_seed(seed)]
    out = ROOT / "benchmarks" / "results" / "tfbind8_enumerate.json"
    out.write_text(json.dumps(rows, indent=2))
    print("| method | seed | oracle score of argmax(r_hat - g_hat) | oracle median, top 64 | oracle median, top 640 "
          "| share of the top 640 in D_off |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seed']} | {r['argmax_oracle']:.3f} | {r['top64_oracle_median']:.3f} | "
              f"{r['top640_oracle_median']:.3f} | {r['top640_share_in_d_off']:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where a fine-tuned Gaussian policy's reward comes from: the relaxed x0 the reward sees in training, or the
designs the policy actually emits (issue 12).

On utr_mrl's Gaussian backbone STRL and BRAID-Boot put almost all of their whole-path KL in the last denoising
step (about 210 of 215 nats), BRAID-Bonus does not (about 1 of 13), and BRAID-Bonus's designs score higher. During
fine-tuning the reward sees the relaxed one-hot softmax(x0 / temperature) (``GaussianOneHotDiffusion.reward_input``),
while a design is argmax(x0). This script samples each fine-tuned policy of finished quality-benchmark run
directories and scores both under the run's own reward ensemble: r_hat on the relaxed input, r_hat on the
decoded one-hot design, the bonus g_hat on both (the run's strength), the distance of x0 from the one-hot
vertices, and the oracle on the designs. A large r_hat(relaxed) - r_hat(decoded) means the policy is optimising
an input no design reaches.

    .venv/bin/python benchmarks/relaxation_gap.py runs/bench2/utr_mrl/seed1/alpha0.001 \
        runs/bench2/utr_mrl/seed1/alpha0.001-braid_bonus runs/bench2/utr_mrl/seed2/alpha0.001

Rows go to ``benchmarks/results/relaxation_gap.jsonl`` (one per run directory x method, replaced when re-run) and
the table to ``relaxation_gap.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from braid_ray.config import load_config
from braid_ray.diffusion.sampler import FineTunedPolicy, rollout
from braid_ray.evaluate import pretrained_models, tuned_policy
from braid_ray.finetune.run import load_reward
from braid_ray.rundir import RunDir
from braid_ray.stages import data_stage, oracle_stage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSONL = RESULTS / "relaxation_gap.jsonl"

log = logging.getLogger("relaxation_gap")


@torch.no_grad()
def gap(policy: FineTunedPolicy, reward, oracle, n: int, batch: int, seed: int) -> dict:
    """Sample n x0 from ``policy``; r_hat and the bonus on the relaxed input and on the decoded design."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.cat([rollout(policy, min(batch, n - i), 1, g, use_checkpoint=False).x0 for i in range(0, n, batch)])
    backbone = policy.backbone
    relaxed = backbone.reward_input(x0)
    codes = backbone.decode(x0)
    hard = F.one_hot(codes, 4).to(relaxed.dtype)
    (r_soft, g_soft), (r_hard, g_hard) = reward(relaxed, "bonus"), reward(hard, "bonus")
    y = oracle.score(codes.numpy().astype(np.int8))
    return {"n": n, "r_hat_relaxed": float(r_soft.mean()), "r_hat_decoded": float(r_hard.mean()),
            "relaxation_gap": float((r_soft - r_hard).mean()),
            "bonus_relaxed": float(g_soft.mean()), "bonus_decoded": float(g_hard.mean()),
            "max_prob": float(relaxed.max(-1).values.mean()),  # 1 = the relaxed input is one-hot
            "onehot_distance": float((x0.abs() - 1).abs().mean()), "x0_abs_max": float(x0.abs().amax((1, 2)).mean()),
            "oracle_median": float(np.median(y))}


def load_run(run: Path):
    """(config, run dir, oracle, backbone, pretrained denoiser, reward under the bonus) of a finished run."""
    cfg = load_config(run / "eval" / "config.yaml")
    rd = RunDir(str(run))
    data = data_stage(cfg, rd)
    backbone, pretrained = pretrained_models(cfg, rd, data.d.length)
    return (cfg, rd, oracle_stage(cfg, rd, data), backbone, pretrained,
            load_reward(str(run), "bonus", cfg.finetune.strength))


def run_dir_rows(run: Path, n: int) -> list[dict]:
    cfg, rd, oracle, backbone, pretrained, reward = load_run(run)
    rows = []
    policies = {"Pretrained": FineTunedPolicy(backbone, pretrained, cfg.finetune.parameterization)}
    for method in cfg.finetune.methods:
        policies[method] = tuned_policy(cfg, rd, backbone, pretrained, method)
    for name, policy in policies.items():
        row = {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run), "method": name,
               "alpha": cfg.finetune.alpha, "seed": cfg.run.seed, "temperature": cfg.finetune.temperature,
               **gap(policy, reward, oracle, n, cfg.eval.batch_size, cfg.run.seed + 101)}
        log.info("%s %s: r_hat relaxed %.3f decoded %.3f (gap %+.3f), bonus %.3f / %.3f, oracle %.3f", run.name, name,
                 row["r_hat_relaxed"], row["r_hat_decoded"], row["relaxation_gap"], row["bonus_relaxed"],
                 row["bonus_decoded"], row["oracle_median"])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | method | r_hat on relaxed x0 | r_hat on the design | gap | bonus on relaxed / design | "
             "mean max prob of the relaxed input | mean abs(abs(x0) - 1) | oracle median |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['r_hat_relaxed']:.3f} | {r['r_hat_decoded']:.3f} | "
                     f"{r['relaxation_gap']:+.3f} | {r['bonus_relaxed']:.3f} / {r['bonus_decoded']:.3f} | "
                     f"{r['max_prob']:.3f} | {r['onehot_distance']:.3f} | {r['oracle_median']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished quality-benchmark run directories (with an eval stage)")
    ap.add_argument("--n", type=int, default=256, help="samples per policy")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    runs = [Path(r).resolve() for r in args.runs]
    for r in runs:
        if not (r / "eval" / "config.yaml").is_file():
            raise SystemExit(f"{r}: no finished eval stage (eval/config.yaml); give a quality-benchmark run directory")
    old = [json.loads(line) for line in JSONL.read_text().splitlines()] if JSONL.exists() else []
    new = [row for r in runs for row in run_dir_rows(r, args.n)]
    names = {row["run"] for row in new}
    rows = [row for row in old if row["run"] not in names] + new
    JSONL.parent.mkdir(parents=True, exist_ok=True)
    JSONL.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = table(rows)
    runs_listed = " ".join(dict.fromkeys(row["run"] for row in rows))  # every run in the table, earlier calls too
    (RESULTS / "relaxation_gap.md").write_text(f"Command: `.venv/bin/python benchmarks/relaxation_gap.py {runs_listed}`"
                                               f" (--n {args.n} in the latest call)\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()

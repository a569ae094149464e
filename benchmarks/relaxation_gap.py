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

It also sets the policy's last-step KL beside the one a closed form predicts at the policy's own samples: a shift
delta of the last step's mean moves x0 by delta and costs |delta|^2 / (2 sigma_1^2), so the linearised objective's
optimum spends KL_1 = sigma_1^2 E|dR/dx0|^2 / (2 alpha^2), with R = r_hat / std_y (the reward alone) or
(r_hat - g_hat) / std_y (under the bonus). A policy whose samples sit where dR/dx0 is large has that much to gain
in the last step whatever its designs are.

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
STEPS_JSONL = RESULTS / "relaxation_gap_steps.jsonl"
STEPS = (1, 2, 3, 5, 8, 12, 16, 20, 30)

log = logging.getLogger("relaxation_gap")


def objective_grad_sq(reward, backbone, x: torch.Tensor, penalty: str, to_x0=lambda x: x) -> torch.Tensor:
    """|d R / d x|^2 per sample (n,), R = (r_hat - g_hat) / std_y on the relaxed input of x0 = ``to_x0(x)``, with
    g_hat under ``penalty`` ("none": the reward alone): the gradient a shift of x sees (x = x0: the last step)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        r_hat, g_hat = reward(backbone.reward_input(to_x0(x)), penalty)
        (grad,) = torch.autograd.grad(((r_hat - g_hat) / reward.stats.y_std).sum(), x)
    return grad.pow(2).sum(dim=(1, 2))


def predicted_last_step_kl(grad_sq: torch.Tensor, sigma: float, alpha: float) -> float:
    """The last step's KL at the optimum of the linearised objective: maximising grad . delta - alpha |delta|^2 /
    (2 sigma_1^2) over the shift delta of the last step's mean gives delta = sigma_1^2 grad / alpha, so
    KL_1 = sigma_1^2 E|grad|^2 / (2 alpha^2), bought for a gain of 2 alpha KL_1."""
    return float(sigma**2 * grad_sq.mean() / (2 * alpha**2))


@torch.no_grad()
def gap(policy: FineTunedPolicy, reward, oracle, n: int, batch: int, seed: int, alpha: float) -> dict:
    """Sample n x0 from ``policy``; r_hat and the bonus on the relaxed input and on the decoded design; the
    policy's last-step KL, and the one the linearised objective predicts at these samples (see
    ``predicted_last_step_kl``), for the reward alone and for r_hat - g_hat under the bonus."""
    g = torch.Generator().manual_seed(seed)
    rolls = [rollout(policy, min(batch, n - i), 1, g, use_checkpoint=False) for i in range(0, n, batch)]
    x0 = torch.cat([r.x0 for r in rolls])
    backbone = policy.backbone
    relaxed = backbone.reward_input(x0)
    codes = backbone.decode(x0)
    hard = F.one_hot(codes, 4).to(relaxed.dtype)
    (r_soft, g_soft), (r_hard, g_hard) = reward(relaxed, "bonus"), reward(hard, "bonus")
    y = oracle.score(codes.numpy().astype(np.int8))
    sigma = backbone.schedule.sigma(1)
    return {"n": n, "r_hat_relaxed": float(r_soft.mean()), "r_hat_decoded": float(r_hard.mean()),
            "relaxation_gap": float((r_soft - r_hard).mean()),
            "bonus_relaxed": float(g_soft.mean()), "bonus_decoded": float(g_hard.mean()),
            "max_prob": float(relaxed.max(-1).values.mean()),  # 1 = the relaxed input is one-hot
            "onehot_distance": float((x0.abs() - 1).abs().mean()), "x0_abs_max": float(x0.abs().amax((1, 2)).mean()),
            "kl_last": float(torch.cat([r.kl for r in rolls]).mean()),
            "kl_last_pred_reward": predicted_last_step_kl(objective_grad_sq(reward, backbone, x0, "none"), sigma,
                                                          alpha),
            "kl_last_pred_bonus": predicted_last_step_kl(objective_grad_sq(reward, backbone, x0, "bonus"), sigma,
                                                         alpha),
            "oracle_median": float(np.median(y))}


def pretrained_chain(backbone, pretrained, n: int, seed: int) -> tuple[dict, dict]:
    """n pretrained trajectories: the states x_t and the noise drawn at each step t = T..1."""
    g = torch.Generator().manual_seed(seed)
    states, noise = {}, {}
    with torch.no_grad():
        x = backbone.prior(n, g)
        for t in range(backbone.steps, 0, -1):
            states[t], noise[t] = x, backbone.noise(x, t, g)
            x = backbone.step(backbone.policy(pretrained, x, t), x, t, noise[t])
    return states, noise


def carry(backbone, pretrained, x_prev: torch.Tensor, j: int, noise: dict) -> torch.Tensor:
    """x0 from x_{j-1} through the pretrained steps j-1..1 with their noise held fixed (a graph to x_prev)."""
    x = x_prev
    for t in range(j - 1, 0, -1):
        x = backbone.step(backbone.policy(pretrained, x, t), x, t, noise[t])
    return x


def shift_sensitivity(backbone, pretrained, reward, steps: list[int], n: int, seed: int, alpha: float,
                      penalty: str = "none") -> list[dict]:
    """What a shift of step j's mean could buy through the pretrained steps after it, at pretrained trajectories:
    per sample KL_j = sigma_j^2 |dR(x0) / dx_{j-1}|^2 / (2 alpha^2) (``predicted_last_step_kl``'s closed form, with
    the gradient carried back through the pretrained steps j-1..1; j = 1 is the last step). The mean, median and
    99th percentile over the n samples, per step."""
    states, noise = pretrained_chain(backbone, pretrained, n, seed)
    rows = []
    for j in steps:
        with torch.no_grad():
            mean, sigma = backbone.policy(pretrained, states[j], j)
        x_prev = mean + sigma * noise[j]  # x_{j-1}
        grad_sq = objective_grad_sq(reward, backbone, x_prev, penalty,
                                    lambda x, j=j: carry(backbone, pretrained, x, j, noise))
        kl = (sigma**2 * grad_sq / (2 * alpha**2)).numpy()
        rows.append({"step": j, "sigma": float(sigma), "penalty": penalty, "n": n, "kl_mean": float(kl.mean()),
                     "kl_median": float(np.median(kl)), "kl_p99": float(np.quantile(kl, 0.99))})
    return rows


def load_run(run: Path):
    """(config, run dir, oracle, backbone, pretrained denoiser, reward under the bonus) of a finished run."""
    cfg = load_config(run / "eval" / "config.yaml")
    rd = RunDir(str(run))
    data = data_stage(cfg, rd)
    backbone, pretrained = pretrained_models(cfg, rd, data.d.length)
    return (cfg, rd, oracle_stage(cfg, rd, data), backbone, pretrained,
            load_reward(str(run), "bonus", cfg.finetune.strength))


def run_dir_rows(run: Path, n: int, loaded: tuple | None = None) -> list[dict]:
    cfg, rd, oracle, backbone, pretrained, reward = loaded or load_run(run)
    rows = []
    policies = {"Pretrained": FineTunedPolicy(backbone, pretrained, cfg.finetune.parameterization)}
    for method in cfg.finetune.methods:
        policies[method] = tuned_policy(cfg, rd, backbone, pretrained, method)
    for name, policy in policies.items():
        row = {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run), "method": name,
               "alpha": cfg.finetune.alpha, "seed": cfg.run.seed, "temperature": cfg.finetune.temperature,
               **gap(policy, reward, oracle, n, cfg.eval.batch_size, cfg.run.seed + 101, cfg.finetune.alpha)}
        log.info("%s %s: r_hat relaxed %.3f decoded %.3f (gap %+.3f), bonus %.3f / %.3f, oracle %.3f", run.name, name,
                 row["r_hat_relaxed"], row["r_hat_decoded"], row["relaxation_gap"], row["bonus_relaxed"],
                 row["bonus_decoded"], row["oracle_median"])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | method | r_hat on relaxed x0 | r_hat on the design | gap | bonus on relaxed / design | "
             "mean max prob of the relaxed input | mean abs(abs(x0) - 1) | last-step KL | predicted: r_hat / "
             "r_hat - bonus | oracle median |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = (f"{r['kl_last']:.1f} | {r['kl_last_pred_reward']:.1f} / {r['kl_last_pred_bonus']:.1f}" if "kl_last" in r
              else "not measured | not measured")
        lines.append(f"| {r['run']} | {r['method']} | {r['r_hat_relaxed']:.3f} | {r['r_hat_decoded']:.3f} | "
                     f"{r['relaxation_gap']:+.3f} | {r['bonus_relaxed']:.3f} / {r['bonus_decoded']:.3f} | "
                     f"{r['max_prob']:.3f} | {r['onehot_distance']:.3f} | {kl} | {r['oracle_median']:.3f} |")
    return "\n".join(lines) + "\n"


def steps_rows(run: Path, steps: list[int], n: int, loaded: tuple | None = None) -> list[dict]:
    """``shift_sensitivity`` of the run's pretrained model, for the reward alone and under the bonus."""
    cfg, _, _, backbone, pretrained, reward = loaded or load_run(run)
    name = str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run)
    steps = [j for j in steps if j <= backbone.steps]
    return [{"run": name, "seed": cfg.run.seed, "alpha": cfg.finetune.alpha, **row}
            for penalty in ("none", "bonus")
            for row in shift_sensitivity(backbone, pretrained, reward, steps, n, cfg.run.seed + 202,
                                         cfg.finetune.alpha, penalty)]


def steps_table(rows: list[dict]) -> str:
    lines = ["| run | step j | sigma_j | predicted KL_j, r_hat alone: mean / median / p99 | under the bonus: mean / "
             "median / p99 |", "|---|---|---|---|---|"]
    by = {(r["run"], r["step"], r["penalty"]): r for r in rows}
    for run, step in dict.fromkeys((r["run"], r["step"]) for r in rows):
        cells = [f"{by[run, step, p]['kl_mean']:.3g} / {by[run, step, p]['kl_median']:.3g} / "
                 f"{by[run, step, p]['kl_p99']:.3g}" for p in ("none", "bonus")]
        lines.append(f"| {run} | {step} | {by[run, step, 'none']['sigma']:.4f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _merge(path: Path, new: list[dict]) -> list[dict]:
    """The rows of ``path`` whose run is not in ``new``, then ``new``; written back to ``path``."""
    old = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    names = {row["run"] for row in new}
    rows = [row for row in old if row["run"] not in names] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def write_report(rows: list[dict], step_rows: list[dict], n: int) -> str:
    """``relaxation_gap.md``: the command over every run in ``rows``, then both tables; returns the tables."""
    text = table(rows) + "\nWhat a shift of one step's mean could buy through the pretrained steps after it " \
        "(`shift_sensitivity`, at the run's pretrained trajectories):\n\n" + steps_table(step_rows)
    runs_listed = " ".join(dict.fromkeys(row["run"] for row in rows))  # every run in the table, earlier calls too
    (RESULTS / "relaxation_gap.md").write_text(f"Command: `.venv/bin/python benchmarks/relaxation_gap.py {runs_listed}`"
                                               f" (--n {n} in the latest call)\n\n" + text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished quality-benchmark run directories (with an eval stage)")
    ap.add_argument("--n", type=int, default=256, help="samples per policy")
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS),
                    help="steps j whose mean's shift is carried back through the pretrained chain (1 = the last)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    runs = [Path(r).absolute() for r in args.runs]  # not resolved: a run under a linked runs/ keeps its name
    for r in runs:
        if not (r / "eval" / "config.yaml").is_file():
            raise SystemExit(f"{r}: no finished eval stage (eval/config.yaml); give a quality-benchmark run directory")
    # one sensitivity table per pretrained model: run directories of one seed share it, and a stored one is kept
    stored = [json.loads(line) for line in STEPS_JSONL.read_text().splitlines()] if STEPS_JSONL.exists() else []
    measured = {row.get("pretrain") for row in stored}
    new, new_steps = [], []
    for r in runs:
        loaded = load_run(r)  # once per run: both tables read it
        new += run_dir_rows(r, args.n, loaded)
        fp = loaded[1].stage("pretrain").read_json("stage.json")["fingerprint"]
        if fp not in measured:
            measured.add(fp)
            new_steps += [{**row, "pretrain": fp} for row in steps_rows(r, args.steps, args.n, loaded)]
    rows, step_rows = _merge(JSONL, new), _merge(STEPS_JSONL, new_steps)
    print(write_report(rows, step_rows, args.n))


if __name__ == "__main__":
    main()

"""The evaluation stage: N designs per method, scored by an oracle the methods never saw.

Methods: Offline (top) = the N best rows of D_off by their measured y, Offline (random) = N random rows
of D_off, Grad. = gradient ascent on r_hat from Offline (top) (design-bench's reference optimiser, no
diffusion model), Pretrained, and each fine-tuned method. Writes samples.parquet, designs.fasta, metrics.json,
report.md and the plots to eval/.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors

from braid_ray.baselines.grad import gradient_ascent
from braid_ray.config import Config
from braid_ray.diffusion.pretrain import build_backbone
from braid_ray.diffusion.sampler import FineTunedPolicy, rollout
from braid_ray.eval import (method_metrics, results_table, samples_frame, score_distributions, to_markdown,
                            training_curves, write_fasta, write_report)
from braid_ray.finetune.run import load_pretrained, load_reward
from braid_ray.finetune.trainer import METHODS
from braid_ray.oracles import Oracle
from braid_ray.reward.fit import score
from braid_ray.rundir import RunDir
from braid_ray.stages import DataResult

log = logging.getLogger(__name__)

GRAD = "Grad. (r_hat)"
LABELS = {"strl": "STRL", "braid_boot": "BRAID-Boot", "braid_bonus": "BRAID-Bonus", "braid_lcb": "BRAID-LCB"}


@torch.no_grad()
def sample_codes(policy: FineTunedPolicy, n: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n hard designs (codes (n, L)) from ``policy`` and the mean distance of its x0 from the one-hot vertices."""
    g = torch.Generator().manual_seed(seed)
    xs = [rollout(policy, min(batch, n - i), 1, g, use_checkpoint=False).x0 for i in range(0, n, batch)]
    x0 = torch.cat(xs)
    return policy.backbone.decode(x0).numpy().astype(np.int8), (x0.abs() - 1).abs().mean((1, 2)).numpy()


def evaluate_stage(cfg: Config, run: RunDir, data: DataResult, oracle: Oracle, methods: list[str]) -> pd.DataFrame:
    """Sample, score and report every method; returns the results table (one row per method)."""
    stage = run.stage("eval")
    d, s, n = data.d, data.splits, cfg.eval.n_samples
    rng = np.random.default_rng(cfg.run.seed)
    off_codes, off_y = d.codes[s.off], d.y[s.off]
    codes: dict[str, np.ndarray] = {
        "Offline (top)": off_codes[np.argsort(-off_y)[:n]],
        "Offline (random)": off_codes[rng.choice(len(off_codes), size=min(n, len(off_codes)), replace=False)],
    }
    reward = load_reward(run.uri, "none", cfg.finetune.strength)
    if cfg.eval.grad_ascent:
        codes[GRAD] = gradient_ascent(reward, codes["Offline (top)"], cfg.eval.grad_steps, cfg.eval.grad_lr)
    backbone = build_backbone(cfg.diffusion, d.length, cfg.finetune.temperature, cfg.finetune.straight_through)
    pretrained = load_pretrained(cfg, run.uri, d.length)
    policy = FineTunedPolicy(backbone, pretrained, cfg.finetune.parameterization)
    extra: dict[str, dict[str, np.ndarray]] = {"onehot_distance": {}}
    codes["Pretrained"], extra["onehot_distance"]["Pretrained"] = sample_codes(policy, n, cfg.eval.batch_size,
                                                                                cfg.run.seed)
    curves = {}
    for method in methods:
        tuned = FineTunedPolicy(backbone, pretrained, cfg.finetune.parameterization)
        tuned.trainable.load_state_dict(load_safetensors(run.stage(f"finetune/{method}").read_bytes(
            "trainable.safetensors")))
        label = LABELS[method]
        codes[label], extra["onehot_distance"][label] = sample_codes(tuned, n, cfg.eval.batch_size, cfg.run.seed)
        curves[label] = run.stage(f"finetune/{method}").read_parquet("history.parquet")
    scores = {name: oracle.score(c) for name, c in codes.items()}
    best_offline = float(oracle.score(off_codes).max())  # the best offline design, scored like every design
    extra["r_hat"], extra["g_hat"] = {}, {}
    for method in methods:
        r, g = score(reward, codes[LABELS[method]], METHODS[method])
        extra["r_hat"][LABELS[method]], extra["g_hat"][LABELS[method]] = r, g
    metrics = {name: method_metrics(c, scores[name], best_offline, d.codes) for name, c in codes.items()}
    table = results_table(metrics)

    stage.write_parquet("samples.parquet", samples_frame(codes, scores, extra))
    stage.write_json("metrics.json", {"task": data.task.name, "oracle": oracle.info, "best_offline": best_offline,
                                      "n_samples": n, "methods": metrics})
    out = stage.local_path() if run.is_local() else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_fasta(codes, scores, out / "designs.fasta")
        plots = {"Oracle scores per method": score_distributions(
            scores, best_offline, out / "scores.png", f"{data.task.name}: {n} designs per method")}
        if curves:
            plots["r_hat and oracle over fine-tuning"] = training_curves(curves, out / "training.png")
        notes = [f"Oracle: {oracle.info.get('kind')} ({oracle.info.get('note', '')}).",
                 f"Best offline design (D_off, scored by the oracle): {best_offline:.4g}.",
                 "Offline rows are real measured designs; generated designs are scored by the oracle only."]
        write_report(out, data.task.name, table, plots, notes)
    log.info("evaluation (%d designs per method, oracle %s):\n%s", n, oracle.info.get("kind"), to_markdown(table))
    return table

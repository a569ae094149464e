"""Pretraining (DDP) and fine-tuning (all-reduced gradients) as Ray Train runs on a local Ray."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from braid_ray import pipeline
from braid_ray.config import load_config
from tests.test_loop import read_scalars

TINY = ["reward.members=2", "reward.epochs=1", "reward.channels=8", "reward.hidden=16",
        "diffusion.epochs=1", "diffusion.steps=4", "diffusion.channels=8", "diffusion.blocks=1",
        "diffusion.batch_size=2048", "finetune.k=2", "finetune.steps=4", "finetune.batch_size=8",
        "finetune.checkpoint_every=2", "finetune.methods=[braid_bonus]", "eval.n_samples=16", "ray.num_workers=2",
        "tracking.tensorboard=true"]


def test_pretrain_and_finetune_on_ray_train(tmp_path: Path, ray_local) -> None:
    cfg = load_config(None, [f"run.dir={tmp_path}", *TINY])
    summary = pipeline.run(cfg)
    assert "| BRAID-Bonus | 16 |" in summary["eval"]
    pre = load_file(str(tmp_path / "pretrain" / "denoiser.safetensors"))
    tuned = load_file(str(tmp_path / "finetune" / "braid_bonus" / "trainable.safetensors"))
    assert pre and tuned and all(torch.isfinite(v).all() for v in tuned.values())
    history = pd.read_parquet(tmp_path / "finetune" / "braid_bonus" / "history.parquet")
    assert history["step"].tolist() == [1, 2, 3, 4] and history["kl"].iloc[0] == 0.0
    # The correction network left zero: fine-tuning changed the policy.
    assert any(v.abs().sum() > 0 for k, v in tuned.items() if k.startswith("out."))
    # Rank 0 wrote every step's scalars for TensorBoard (tracking.tensorboard=true), from the Ray worker.
    scalars = read_scalars(tmp_path / "tensorboard" / "finetune" / "braid_bonus")
    assert [step for step, _ in scalars["train/objective"]] == [1, 2, 3, 4]

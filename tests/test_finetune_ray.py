"""Pretraining (DDP) and fine-tuning (all-reduced gradients) as Ray Train runs on a local Ray."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from braid_ray import pipeline
from tests.test_loop import read_scalars
from tests.tiny import tiny_config

ON_RAY = ("ray.num_workers=2", "finetune.steps=4", "finetune.checkpoint_every=2", "finetune.methods=[braid_bonus]",
          "eval.n_samples=16", "tracking.tensorboard=true")


@pytest.mark.slow  # two Ray Train runs of 2 workers: ~20 s each on 2 CPUs, whatever the model size
def test_pretrain_and_finetune_on_ray_train(tmp_path: Path, ray_local) -> None:
    # The reward ensemble on Ray Train has its own tests (test_reward_ray.py): here it trains in this process, and
    # the run on Ray reuses it (a stage's record never says where it ran).
    pipeline.run(tiny_config(f"run.dir={tmp_path}", *ON_RAY, "ray.num_workers=0"), stages=("data", "reward"))
    cfg = tiny_config(f"run.dir={tmp_path}", *ON_RAY)
    summary = pipeline.run(cfg)
    assert not (tmp_path / "reward" / "ray").exists() and any((tmp_path / "pretrain" / "ray").iterdir())
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

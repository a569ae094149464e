"""Sweep trials that share a GPU (sweep.gpus_per_trial) fine-tune on it. Marked ``gpu``; skipped where torch sees no
CUDA device (every machine of this project so far)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from braid_ray import pipeline
from braid_ray.sweep import load_sweep
from tests.test_sweep import upstream, write_sweep  # noqa: F401  (upstream: the module's fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_trials_sharing_one_gpu_train_on_cuda(tmp_path: Path, upstream: Path, ray_local) -> None:  # noqa: F811
    path = write_sweep(tmp_path / "gpu.yaml", upstream, {"finetune.alpha": {"grid": [1e-3, 0.1]}},
                       {"name": "gpu", "storage": str(tmp_path / "sweeps"), "oracle_budget": 8,
                        "gpus_per_trial": 0.5, "cpus_per_trial": 0.5})
    outcome = pipeline.sweep(load_sweep(path))
    trials = outcome.trials
    assert (trials["status"] == "finished").all() and (trials["device"] == "cuda").all()
    assert (trials["oracle_queries"] == 8).all() and trials["oracle_score"].notna().all()

"""The sequence GPU path for real: reward members on GPU workers, DDP pretraining and fine-tuning over NCCL,
and in-process fine-tuning on run.device=cuda. Marked ``gpu``; skipped where torch sees no CUDA device (every
machine of this project: see the README's cluster section for where they were run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from braid_ray import pipeline
from braid_ray.config import load_config
from braid_ray.rundir import RunDir
from tests.tiny import FAST

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
def test_sequence_stages_on_gpu_ray_workers(tmp_path: Path, ray_local) -> None:
    workers = min(torch.cuda.device_count(), 2)
    cfg = load_config(None, [*FAST, f"run.dir={tmp_path}", "ray.use_gpu=true", f"ray.num_workers={workers}",
                             "reward.members=4", f"finetune.batch_size={8 * workers}", "finetune.steps=3",
                             "finetune.methods=[braid_boot]"])
    pipeline.run(cfg, stages=("data", "reward", "pretrain", "finetune"))
    run = RunDir(cfg.run.dir)
    members = run.stage("reward").read_json("members.json")["members"]
    assert len(members) == 4 and all(m["device"].startswith("cuda") for m in members)
    history = run.stage("finetune/braid_boot").read_parquet("history.parquet")
    assert history["step"].tolist() == [1, 2, 3]
    assert history[["objective", "kl", "grad_norm"]].notna().all().all()
    assert (history["peak_memory_mb"] > 0).all()  # torch.cuda.max_memory_allocated on rank 0


@pytest.mark.gpu
@requires_cuda
def test_in_process_fine_tuning_on_cuda(tmp_path: Path) -> None:
    cfg = load_config(None, [*FAST, f"run.dir={tmp_path}", "run.device=cuda", "finetune.methods=[strl]"])
    torch.cuda.reset_peak_memory_stats()
    pipeline.run(cfg, stages=("data", "reward", "pretrain", "finetune"))
    history = RunDir(cfg.run.dir).stage("finetune/strl").read_parquet("history.parquet")
    assert len(history) == cfg.finetune.steps and torch.cuda.max_memory_allocated() > 0


@pytest.mark.slow
def test_the_gpu_smoke_script_runs_its_checks_on_the_cpu(tmp_path: Path) -> None:
    """launch/gpu_smoke.py --cpu: the same checks over gloo, so the script a user runs on a GPU node works."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    args = ["--cpu", f"run.dir={tmp_path}", "task.name=tfbind5", "diffusion.steps=5", "finetune.k=2",
            "finetune.steps=2", "reward.epochs=1", "diffusion.epochs=1", "eval.n_samples=16"]
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_smoke.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    passed = [line for line in out.stdout.splitlines() if line.startswith("PASS")]
    assert len(passed) == 6 and "gpu_smoke: all checks passed" in out.stdout
    assert "Reporting training result" not in out.stderr  # Ray's INFO chatter is off by default

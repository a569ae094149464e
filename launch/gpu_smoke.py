"""Check the whole GPU path on one GPU node in a few minutes: reward members, DDP pretraining and fine-tuning
over NCCL on Ray Train, and in-process fine-tuning on run.device=cuda, on a tiny TFBind8 run.

    python launch/gpu_smoke.py                      # on a node with >= 1 GPU
    ray job submit --working-dir . -- python launch/gpu_smoke.py run.dir=s3://bucket/smoke
    python launch/gpu_smoke.py --cpu                # the same checks on the CPU (tests the script itself)

Prints one line per check and exits 1 if any failed. Numbers from a tiny model say nothing about quality.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from braid_ray import cli, pipeline
from braid_ray.config import load_config
from braid_ray.rundir import RunDir

TINY = ["reward.members=4", "reward.epochs=2", "reward.channels=16", "reward.hidden=32",
        "diffusion.epochs=2", "diffusion.steps=20", "diffusion.channels=16", "diffusion.blocks=1",
        "finetune.k=5", "finetune.steps=6", "finetune.checkpoint_every=3", "finetune.methods=[strl,braid_boot]",
        "eval.n_samples=64", "eval.grad_ascent=false", "ray.cpus_per_worker=1", "tracking.progress=lines"]


def _check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> None:
    cli.setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    cpu = "--cpu" in args
    user = [a for a in args if a != "--cpu"]
    gpus = torch.cuda.device_count()
    if gpus == 0 and not cpu:
        sys.exit("gpu_smoke: torch sees no CUDA device (a CPU-only torch build, or no GPU on this node)")
    kind, workers = ("cpu", 2) if cpu else ("cuda", min(gpus, 2))
    run_dir = next((a.split("=", 1)[1] for a in user if a.startswith("run.dir=")), tempfile.mkdtemp(prefix="braid-gpu-"))
    overrides = [*TINY, *user, f"run.dir={run_dir}"]
    ok = _check("device", True, f"{gpus} GPU(s){': ' + torch.cuda.get_device_name(0) if gpus else ''}; torch "
                f"{torch.__version__}" + (f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if gpus else ""))

    start = time.perf_counter()
    cfg = load_config(None, [*overrides, f"ray.use_gpu={str(not cpu).lower()}", f"ray.num_workers={workers}",
                             f"finetune.batch_size={16 * workers}", f"diffusion.batch_size={256 * workers}"])
    summary = pipeline.run(cfg)
    run = RunDir(cfg.run.dir)
    members = run.stage("reward").read_json("members.json")["members"]
    devices = sorted({m["device"] for m in members})
    ok &= _check(f"reward members on {kind} workers", all(d.startswith(kind) for d in devices),
                 f"{len(members)} members over {workers} workers on {devices}")
    for method in cfg.finetune.methods:
        history = run.stage(f"finetune/{method}").read_parquet("history.parquet")
        finite = bool(history[["objective", "kl", "grad_norm"]].notna().all().all())
        ok &= _check(f"fine-tune {method} over {'gloo' if cpu else 'NCCL'}",
                     finite and len(history) == cfg.finetune.steps,
                     f"{len(history)} steps, peak memory {history['peak_memory_mb'].max():.0f} MB (rank 0), "
                     f"{history['step_seconds'].median():.3f} s/step")
    ok &= _check("evaluation", "eval" in summary, "designs scored by the oracle")
    print(summary.get("eval", ""))

    local = load_config(None, [*overrides, f"run.dir={run_dir}/in_process", "ray.num_workers=0",
                               f"run.device={kind}", "finetune.methods=[braid_boot]"])
    pipeline.run(local, stages=("data", "reward", "pretrain", "finetune"))
    history = RunDir(local.run.dir).stage("finetune/braid_boot").read_parquet("history.parquet")
    ok &= _check(f"in-process fine-tuning on run.device={kind}",
                 cpu or torch.cuda.max_memory_allocated() > 0, f"peak memory {history['peak_memory_mb'].max():.0f} MB")
    print(f"gpu_smoke: {'all checks passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s "
          f"(run dir {run_dir})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli.run_main(main)

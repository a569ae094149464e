"""Per-rank memory of the model and its optimizer state under DeepSpeed ZeRO-2 and ZeRO-3 vs plain DDP, at 2 ranks.

    .venv/bin/python benchmarks/zero_memory.py            # writes benchmarks/results/zero_memory.json

The trainable module is the tiny SD UNet of the CPU preset, trained in full (every parameter trainable) with
torch Adam in fp32, one real step each (denoising loss), on Ray Train with 2 workers (gloo). After the step
each rank counts the bytes of the tensors it holds, by storage (so views and aliases count once):
- parameters: the module's parameters on this rank (under ZeRO-3 its partition ``ds_tensor``);
- optimizer state: the fp32 master weights DeepSpeed keeps for its optimizer partition, plus Adam's two
  moments (DDP: the moments only; the parameters are the master weights).
Expected, for P parameters, N ranks and fp32 (4 bytes): DDP params 4P, state 8P; ZeRO-2 params 4P, state
(4P + 8P) / N; ZeRO-3 params 4P / N, state (4P + 8P) / N. Measured values sit slightly above where
DeepSpeed pads its flat partitions for alignment.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from braid_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "zero_memory.json"
MODES = ("ddp", "zero2", "zero3")
RANKS = 2


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _adam_moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]


def _worker(config: dict) -> list[dict]:
    torch.set_num_threads(1)
    from braid_ray.images.components import tiny_unet

    mode, rank = config["mode"], ray.train.get_context().get_world_rank()
    unet = tiny_unet().requires_grad_(True)
    n_params = sum(p.numel() for p in unet.parameters())
    g = torch.Generator().manual_seed(rank)
    x, noise, text = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g),
                      torch.randn(2, 16, 16, generator=g))
    t = torch.full((2,), 500)
    if mode == "ddp":
        model = ray.train.torch.prepare_model(unet, move_to_device=False)
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
        loss = (model(x, t, encoder_hidden_states=text).sample - noise).square().mean()
        loss.backward()
        opt.step()
        params = _bytes(p.data for p in unet.parameters())
        master = 0
        moments = _bytes(_adam_moments(opt))
    else:
        from braid_ray.distributed.images import _import_deepspeed
        from braid_ray.images.zero import deepspeed_config

        deepspeed = _import_deepspeed(use_gpu=False)
        cfg = load_config(ROOT / "configs" / "sd_tiny_cpu.yaml",
                          [f"deepspeed.zero_stage={mode[-1]}", "deepspeed.param_persistence_threshold=0",
                           f"finetune.batch_size={2 * RANKS}"])
        adam = torch.optim.Adam(unet.parameters(), lr=1e-4)
        engine, opt, _, _ = deepspeed.initialize(model=unet, optimizer=adam, config=deepspeed_config(cfg, RANKS))
        loss = (engine(x, t, encoder_hidden_states=text).sample - noise).square().mean()
        engine.backward(loss)
        engine.step()
        if mode == "zero3":
            params = _bytes(p.ds_tensor for p in unet.parameters())
            master_groups = opt.fp32_partitioned_groups_flat
        else:
            params = _bytes(p.data for p in unet.parameters())
            master_groups = opt.single_partition_of_fp32_groups
        master = _bytes(master_groups)
        moments = _bytes(_adam_moments(opt.optimizer))
    row = {"mode": mode, "rank": rank, "n_params": n_params, "param_bytes": params, "master_bytes": master,
           "adam_moment_bytes": moments, "optimizer_state_bytes": master + moments,
           "loss": float(loss.detach())}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def expected(mode: str, n_params: int, ranks: int) -> dict[str, float]:
    p = 4 * n_params  # fp32 bytes of one copy of the parameters
    return {"ddp": {"param_bytes": p, "optimizer_state_bytes": 2 * p},
            "zero2": {"param_bytes": p, "optimizer_state_bytes": 3 * p / ranks},
            "zero3": {"param_bytes": p / ranks, "optimizer_state_bytes": 3 * p / ranks}}[mode]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    env = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "DS_ACCELERATOR": "cpu"}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    rows, seconds = [], {}
    try:
        for mode in MODES:
            start = time.perf_counter()
            trainer = TorchTrainer(_worker, train_loop_config={"mode": mode},
                                   scaling_config=ScalingConfig(num_workers=RANKS, resources_per_worker={"CPU": 0.5}),
                                   run_config=RunConfig(name=f"zero-memory-{mode}",
                                                        storage_path=str(ROOT / "runs" / "bench_zero_memory")))
            rows += trainer.fit().return_value
            seconds[mode] = time.perf_counter() - start
            logging.info("%s done in %.1f s", mode, seconds[mode])
    finally:
        ray.shutdown()
    n = rows[0]["n_params"]
    ddp = {k: sum(r[k] for r in rows if r["mode"] == "ddp") / RANKS for k in ("param_bytes", "optimizer_state_bytes")}
    summary = []
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        exp = expected(mode, n, RANKS)
        for key in ("param_bytes", "optimizer_state_bytes"):
            measured = max(r[key] for r in mine)  # the fullest rank
            summary.append({"mode": mode, "what": key, "measured_per_rank": measured, "expected_per_rank": exp[key],
                            "measured_vs_ddp": measured / ddp[key],
                            "expected_vs_ddp": exp[key] / expected("ddp", n, RANKS)[key]})
        total_m = max(r["param_bytes"] + r["optimizer_state_bytes"] for r in mine)
        total_e = exp["param_bytes"] + exp["optimizer_state_bytes"]
        summary.append({"mode": mode, "what": "total", "measured_per_rank": total_m, "expected_per_rank": total_e,
                        "measured_vs_ddp": total_m / (ddp["param_bytes"] + ddp["optimizer_state_bytes"]),
                        "expected_vs_ddp": total_e / sum(expected("ddp", n, RANKS).values())})
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "ray": ray.__version__, "deepspeed": _version("deepspeed")},
           "ranks": RANKS, "n_params": n, "precision": "fp32", "optimizer": "torch Adam",
           "per_rank": rows, "summary": summary, "seconds": seconds}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'mode':6} {'what':22} {'measured':>10} {'expected':>10} {'meas/DDP':>9} {'exp/DDP':>8}")
    for s in summary:
        print(f"{s['mode']:6} {s['what']:22} {s['measured_per_rank']:>10,.0f} {s['expected_per_rank']:>10,.0f} "
              f"{s['measured_vs_ddp']:>9.3f} {s['expected_vs_ddp']:>8.3f}")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()

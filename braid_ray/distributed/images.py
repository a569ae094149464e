"""Stable Diffusion fine-tuning on Ray Train with DeepSpeed ZeRO (stage 2 or 3) for the trainable UNet / LoRA.

Every worker runs the same ImageFineTuner on its own micro-batches; DeepSpeed reduces and shards the
gradients and optimizer state (and with ZeRO-3 the parameters) of the trainable module only. The frozen
VAE, text encoder and reward stay plain modules on every worker. Checkpoints: ``engine.save_checkpoint`` on
all ranks into a per-rank temporary folder, reported with ``ray.train.report`` (a barrier every rank
calls); Ray merges the ranks' files, whose names are unique per rank, into one checkpoint. After a
worker failure Ray restarts the group and every rank resumes from it with ``engine.load_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from braid_ray.config import Config, from_dict
from braid_ray.distributed import cluster

log = logging.getLogger(__name__)

HISTORY = "history.json"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"  # one per rank: each rank samples its own prompts and noise


def _import_deepspeed(use_gpu: bool):
    """DeepSpeed, set up for CPU when there is no GPU (DESIGN.md, Pitfalls): the CPU accelerator, and no
    shared-memory comm op, which would compile C++ for a minute; Ray's gloo process group serves instead."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps edits to this dict
    return deepspeed


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def build_engine(deepspeed, tuner, cfg: Config, world_size: int):
    """A ZeRO engine around the tuner's policy (the UNet and, with LoRA, its adapters; the frozen reference copy
    of full fine-tuning is kept outside); with ``deepspeed.optimizer=torch`` it wraps the tuner's Adam.

    The policy, not the bare UNet, is the engine's module so that ZeRO-3 treats a whole sampler step as one
    module call (see braid_ray.images.sampler)."""
    from braid_ray.images.zero import deepspeed_config

    conf = deepspeed_config(cfg, world_size)
    client_optimizer = None if cfg.deepspeed.optimizer == "deepspeed" else tuner.optimizer
    steps = cfg.finetune.steps
    engine, _, _, _ = deepspeed.initialize(
        model=tuner.policy, optimizer=client_optimizer, config=conf,
        model_parameters=None if client_optimizer is not None else tuner.params,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)))
    return engine


def _worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = from_dict(config["cfg"])
    torch.set_num_threads(config["threads"])
    deepspeed = _import_deepspeed(cfg.ray.use_gpu)
    from braid_ray.images.finetune import ImageFineTuner, build_policy, load_image_reward

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    method = config["method"]
    policy = build_policy(cfg, device)
    reward = load_image_reward(cfg, config["reward_bytes"], method, device)
    tuner = ImageFineTuner(policy, reward, cfg, seed=cfg.run.seed + 7919 * rank, device=device, world_size=world)
    engine = build_engine(deepspeed, tuner, cfg, world)
    tuner.attach(engine)
    if rank == 0:
        log.info("fine-tune %s: ZeRO-%d, %d workers x micro-batch %d x grad_accum %d = %d images per step",
                 method, cfg.deepspeed.zero_stage, world, engine.train_micro_batch_size_per_gpu(),
                 engine.gradient_accumulation_steps(), engine.train_batch_size())

    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a re-submitted run: resume
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, load_module_strict=False)
            tuner.step = int(client["step"])
            tuner.generator.set_state(torch.load(Path(d) / _rng_file(rank), weights_only=True))
            history = json.loads((Path(d) / HISTORY).read_text())
        log.info("fine-tune %s rank %d: resumed at step %d", method, rank, tuner.step)

    ft = cfg.finetune
    exclude_frozen = cfg.image.lora_rank > 0 and not cfg.deepspeed.save_frozen
    fail_at = config.get("fail_at_step")
    while tuner.step < ft.steps:
        m = tuner.train_step()
        metrics = _mean_over_ranks({"step": float(m.step), "objective": m.objective, "r_hat": m.r_hat, "g_hat": m.g_hat,
                                    "kl": m.kl, "kl_last_step": m.kl_last_step, "grad_norm": m.grad_norm,
                                    "k": float(m.k), "oracle": tuner.last_oracle})
        history.append(metrics)
        if rank == 0 and (tuner.step % ft.log_every == 0 or tuner.step == ft.steps):
            log.info("fine-tune %s step %d/%d: r_hat %.4f g_hat %.4f oracle %.4f KL %.4f objective %.4f", method,
                     tuner.step, ft.steps, metrics["r_hat"], metrics["g_hat"], metrics["oracle"], metrics["kl"],
                     metrics["objective"])
        if fail_at is not None and tuner.step == fail_at and rank == world - 1:
            marker = Path(config["fail_marker"])
            if not marker.exists():  # fail once, to exercise Ray's restart and the resume above
                marker.write_text("failed once")
                raise RuntimeError(f"injected worker failure at step {tuner.step} (rank {rank})")
        if tuner.step % ft.checkpoint_every == 0 or tuner.step == ft.steps:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=f"step{tuner.step}", client_state={"step": tuner.step},
                                       exclude_frozen_parameters=exclude_frozen)
                torch.save(tuner.generator.get_state(), Path(tmp) / _rng_file(rank))
                if rank == 0:
                    Path(tmp, HISTORY).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def finetune_images_on_ray(cfg: Config, method: str, reward_bytes: bytes, storage_path: str, name: str,
                           fail_at_step: int | None = None, fail_marker: str | None = None) -> Path:
    """ZeRO fine-tuning of ``method`` on Ray Train; returns the final (merged) checkpoint directory.

    Re-running with the same ``name`` and storage resumes from the last reported checkpoint.
    ``fail_at_step`` (tests of the failure path): the last rank raises once at that step, after the marker
    file ``fail_marker`` is written, and Ray's FailureConfig restarts the group from the last checkpoint.
    """
    cluster.init(cfg.ray)
    config = {"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "method": method,
              "reward_bytes": reward_bytes, "fail_at_step": fail_at_step, "fail_marker": fail_marker}
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.ray.use_gpu else {}
    os.environ.update(env)  # the driver's consolidation imports DeepSpeed too
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=2)))
    result = trainer.fit()
    return Path(result.checkpoint.path)

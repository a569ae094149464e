"""Stable Diffusion fine-tuning on Ray Train with DeepSpeed ZeRO for the trainable UNet / LoRA.

Every worker runs the same ImageFineTuner on its own micro-batches, through the one fine-tuning driver
(``braid_ray.finetune.loop.drive``), on its own device (``ray.train.torch.get_device()``: with ``ray.use_gpu``
its GPU, where NCCL needs every reduced tensor). DeepSpeed reduces and shards the gradients and optimizer
state (ZeRO-1: optimizer state only; ZeRO-2: and gradients; ZeRO-3: and parameters; ``deepspeed.zero_stage``,
by default from what is trained) of the trainable module only. The frozen VAE, text encoder and reward stay
plain modules on every worker.

Checkpoints: ``engine.save_checkpoint`` on all ranks into a per-rank temporary folder, reported with
``ray.train.report`` (a barrier every rank calls); Ray merges the ranks' files, whose names are unique per
rank, into one checkpoint, and keeps the last KEEP_CHECKPOINTS. After a worker failure Ray restarts the group
and every rank resumes from it with ``engine.load_checkpoint``. A non-finite loss is not retried: every rank
stops at that step, before backward, and the last good checkpoint is kept.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from ray.train import Result
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load_file, save_file

from braid_ray.config import Config
from braid_ray.distributed import cluster
from braid_ray.distributed.workers import (RayTrainSink, check_storage, fit, local_dir, run_config, setup_worker,
                                           synced)
from braid_ray.distributed.zero_export import consolidated_fp32
from braid_ray.finetune.loop import NonFiniteStop, drive, tracking_sinks
from braid_ray.finetune.trainer import StepMetrics
from braid_ray.images.zero import deepspeed_config, zero_stage
from braid_ray.rundir import RunDir

log = logging.getLogger(__name__)

HISTORY = "history.json"
K_RNG = "k_rng.safetensors"  # the K stream, shared by all ranks: written by rank 0
KEEP_CHECKPOINTS = 2  # the latest, and the one before in case the latest is incomplete
STEP_KEYS = [f.name for f in fields(StepMetrics)] + ["step_seconds", "samples_per_second", "peak_memory_mb"]


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"  # one per rank: each rank samples its own prompts and noise


def _import_deepspeed(use_gpu: bool):
    """DeepSpeed, set up for CPU when there is no GPU (docs/architecture.md, Pitfalls): the CPU accelerator,
    and no shared-memory comm op, which would compile C++ for a minute; Ray's gloo process group serves instead."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps edits to this dict
    return deepspeed


def all_finite(device: torch.device):
    """Whether every rank's flag is true: a MIN all-reduce of a one-element tensor on ``device``."""

    def agree(ok: bool) -> bool:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    return agree


def build_engine(deepspeed, tuner, cfg: Config, world_size: int):
    """A ZeRO engine around the tuner's policy (the UNet and, with LoRA, its adapters; the frozen reference copy
    of full fine-tuning is kept outside); with ``deepspeed.optimizer=torch`` it wraps the tuner's Adam.

    The policy, not the bare UNet, is the engine's module so that ZeRO-3 treats a whole sampler step as one
    module call (see braid_ray.images.sampler)."""
    conf = deepspeed_config(cfg, world_size)
    client_optimizer = None if cfg.deepspeed.optimizer == "deepspeed" else tuner.optimizer
    steps = cfg.finetune.steps
    engine, _, _, _ = deepspeed.initialize(
        model=tuner.policy, optimizer=client_optimizer, config=conf,
        model_parameters=None if client_optimizer is not None else tuner.params,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)))
    return engine


def _resume(engine, tuner, directory: Path, rank: int, seed: int) -> list[dict]:
    """Restore the engine (weights, optimizer, schedule), the step, this rank's streams; returns the history."""
    loaded, client = engine.load_checkpoint(str(directory), load_module_strict=False)
    if loaded is None:
        raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (no 'latest' tag file) to resume from")
    tuner.step = int(client["step"])
    own = directory / _rng_file(rank)
    if own.is_file():  # safetensors: CPU byte tensors, as Generator.set_state wants even for a CUDA generator
        tuner.generator.set_state(load_file(str(own))["generator"])
    else:  # the checkpoint was written by fewer workers: a fresh stream of this rank's own
        tuner.generator.manual_seed(seed + tuner.step)
    if (directory / K_RNG).is_file():
        tuner.k_generator.set_state(load_file(str(directory / K_RNG))["k_generator"])
    return json.loads((directory / HISTORY).read_text())


def _worker(config: dict) -> dict:
    w = setup_worker(config)
    cfg, rank = w.cfg, w.rank
    deepspeed = _import_deepspeed(cfg.ray.use_gpu)
    from braid_ray.images.finetune import ImageFineTuner, build_policy, load_image_reward

    method, seed = config["method"], cfg.run.seed + 7919 * rank
    policy = build_policy(cfg, w.device)
    reward = load_image_reward(cfg, config["reward_bytes"], method, w.device)
    tuner = ImageFineTuner(policy, reward, cfg, seed=seed, device=w.device, world_size=w.world,
                           all_finite=all_finite(w.device))
    engine = build_engine(deepspeed, tuner, cfg, w.world)
    tuner.attach(engine)
    if rank == 0:
        log.info("fine-tune %s: ZeRO-%d on %s, %d workers x micro-batch %d x grad_accum %d = %d images per step",
                 method, zero_stage(cfg), w.device.type, w.world, engine.train_micro_batch_size_per_gpu(),
                 engine.gradient_accumulation_steps(), engine.train_batch_size())

    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a re-submitted run: resume
        with checkpoint.as_directory() as d:
            history = _resume(engine, tuner, Path(d), rank, seed)
        if rank == 0:
            log.info("fine-tune %s: resumed at step %d", method, tuner.step)

    exclude_frozen = cfg.image.lora_rank > 0 and not cfg.deepspeed.save_frozen

    def save(directory: Path) -> None:  # every rank's files merge into one checkpoint
        engine.save_checkpoint(str(directory), tag=f"step{tuner.step}", client_state={"step": tuner.step},
                               exclude_frozen_parameters=exclude_frozen)
        save_file({"generator": tuner.generator.get_state()}, str(directory / _rng_file(rank)))
        if rank == 0:
            save_file({"k_generator": tuner.k_generator.get_state()}, str(directory / K_RNG))
            (directory / HISTORY).write_text(json.dumps(history))

    ft = cfg.finetune
    sinks = tracking_sinks(cfg.tracking, config["run_dir_local"], f"fine-tune {method}", f"finetune/{method}",
                           ft.steps, ft.log_every, rank)
    try:
        drive(tuner, ft.steps, sinks=[*sinks, RayTrainSink()], save=save, checkpoint_every=ft.checkpoint_every,
              sync=synced(w.device, STEP_KEYS), history=history, world_size=w.world,
              plateau=(ft.plateau_window, ft.plateau_tol))
    except NonFiniteStop as e:
        log.error("fine-tune %s: %s", method, e)
        return {"nonfinite": str(e)}
    return {}


def _checkpoint_where(result: Result, storage_path: str) -> str:
    """'step N, at <where the last checkpoint is>' for the error of a stopped run."""
    if result.checkpoint is None:
        return "none was written before it"
    step = next((m.get("step") for c, m in result.best_checkpoints if c.path == result.checkpoint.path), None)
    path = result.checkpoint.path
    if "://" in storage_path and "://" not in path:  # a bucket's path comes without its scheme
        path = f"{storage_path.split('://', 1)[0]}://{path}"
    return f"step {int(step)}, at {path}" if step is not None else f"at {path}"


def finetune_images_on_ray(cfg: Config, method: str, reward_bytes: bytes, storage_path: str, name: str,
                           callbacks: list | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """ZeRO fine-tuning of ``method`` on Ray Train; returns the consolidated fp32 weights of the trainable module
    (keys as in the policy's state dict) and the per-step history.

    ``storage_path``: a local path or a bucket URI (on a multi-node cluster, a bucket or a shared filesystem).
    Re-running with the same ``name`` and storage resumes from the last reported checkpoint. A non-finite loss
    raises FloatingPointError naming the step and the last good checkpoint, which stays in storage.
    ``callbacks``: Ray Train callbacks (e.g. Tune's, to pass every step's report to a trial).
    """
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, storage_path)
    if not cfg.ray.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the consolidation below imports DeepSpeed here too
    # ZeRO-2/3 move the whole gradient (and ZeRO-3 the parameters) every step: GPU ranks share one node's NVLink.
    # ZeRO-1 (LoRA by default) moves a few MB per step and may span nodes.
    one_node = cfg.ray.use_gpu and zero_stage(cfg) >= 2
    run = RunDir(cfg.run.dir)  # for TensorBoard's folder, when run.dir is local
    local = str(run.stage("").local_path()) if run.is_local() else None
    config = {"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "method": method,
              "reward_bytes": reward_bytes, "run_dir_local": local}
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers, one_node=one_node),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=run_config(name, storage_path, keep=KEEP_CHECKPOINTS, callbacks=callbacks,
                              ray_logs=cfg.tracking.ray_logs))
    result = fit(trainer, f"fine-tune {method}", storage_path, name)
    stop = (result.return_value or {}).get("nonfinite")
    if stop:
        raise FloatingPointError(f"fine-tune {method}: {stop} ({_checkpoint_where(result, storage_path)}). Lower "
                                 "finetune.lr or finetune.clip, then re-run with run.overwrite=true")
    with local_dir(result.checkpoint) as d:  # a downloaded copy when storage is a bucket
        return consolidated_fp32(d), json.loads((d / HISTORY).read_text())

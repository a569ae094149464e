"""Diffusion pretraining and BRAID fine-tuning as Ray Train data-parallel runs.

Each worker runs the core loop on its share of the batch; gradients are averaged across workers with an
all-reduce after backward (pretraining through DDP, fine-tuning explicitly, because the sampler calls the
network K times before one backward). Rank 0 writes checkpoints; every rank reports the same
(all-reduced) metrics, as ``ray.train.report`` is a barrier that keeps rank 0's.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer, prepare_model
from safetensors.torch import load_file, save_file

from braid_ray.config import Config, from_dict
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser, pretrain
from braid_ray.dist import cluster
from braid_ray.finetune.run import FinetuneJob, build_finetuner, load_trainer_state, trainer_state_files

log = logging.getLogger(__name__)


def _setup_worker(config: dict) -> tuple[Config, int, int]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    return from_dict(config["cfg"]), ctx.get_world_rank(), ctx.get_world_size()


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce-average the gradients of ``params`` over the process group (no-op for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


# ---------------------------------------------------------------------------------------------
# Pretraining


def _pretrain_worker(config: dict) -> list[float]:
    cfg, rank, world = _setup_worker(config)
    codes = np.asarray(config["codes"], dtype=np.int8)
    shard = codes[rank::world]
    backbone = build_backbone(cfg.diffusion, codes.shape[1])
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = prepare_model(build_denoiser(cfg.diffusion, codes.shape[1]), move_to_device=False)

    def on_epoch(epoch: int, loss: float) -> None:
        metrics = _mean_across_ranks({"epoch": float(epoch), "loss": loss})
        if rank == 0:
            log.info("pretrain epoch %d/%d: loss %.4f", epoch, cfg.diffusion.epochs, metrics["loss"])
        if epoch == cfg.diffusion.epochs:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    module = model.module if hasattr(model, "module") else model
                    save_file(module.state_dict(), f"{tmp}/denoiser.safetensors")
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(metrics)
        else:
            ray.train.report(metrics)

    losses = pretrain(model, backbone, shard, cfg.diffusion, cfg.run.seed + 1000 * rank,
                      batch_size=max(1, cfg.diffusion.batch_size // world), on_epoch=on_epoch)
    return losses


def pretrain_on_ray(cfg: Config, codes: np.ndarray, storage_path: str, name: str) -> tuple[dict, list[float]]:
    """Data-parallel pretraining on Ray Train; returns the denoiser's state dict and the per-epoch losses."""
    cluster.init(cfg.ray)
    trainer = TorchTrainer(
        _pretrain_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "codes": codes},
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=2)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = load_file(str(Path(d) / "denoiser.safetensors"))
    return state, list(result.return_value)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def _finetune_worker(config: dict) -> None:
    cfg, rank, world = _setup_worker(config)
    job = FinetuneJob(**config["job"])
    tuner = build_finetuner(cfg, job, seed=cfg.run.seed + 7919 * rank, grad_sync=average_gradients)
    checkpoint = ray.train.get_checkpoint()
    history: list[dict] = []
    if checkpoint is not None:  # resume after a worker failure or a re-submitted job
        with checkpoint.as_directory() as d:
            history = load_trainer_state(tuner, Path(d))
        log.info("fine-tune %s: resumed at step %d", job.method, tuner.step)
    ft = cfg.finetune
    while tuner.step < ft.steps:
        m = tuner.train_step()
        metrics = _mean_across_ranks({k: float(v) for k, v in vars(m).items()})
        history.append(metrics)
        if rank == 0 and (tuner.step % ft.log_every == 0 or tuner.step == ft.steps):
            log.info("fine-tune %s step %d/%d: r_hat %.4f g_hat %.4f KL %.4f objective %.4f", job.method,
                     tuner.step, ft.steps, metrics["r_hat"], metrics["g_hat"], metrics["kl"], metrics["objective"])
        if tuner.step % ft.checkpoint_every == 0 or tuner.step == ft.steps:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    for name, data in trainer_state_files(tuner, history).items():
                        Path(tmp, name).write_bytes(data)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(metrics)


def finetune_on_ray(cfg: Config, job: FinetuneJob, storage_path: str, name: str) -> Path:
    """Data-parallel fine-tuning on Ray Train; returns the directory of the final checkpoint.

    Re-running with the same ``name`` and storage resumes from the last reported checkpoint.
    """
    cluster.init(cfg.ray)
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "job": vars(job)},
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=2)))
    result = trainer.fit()
    return Path(result.checkpoint.path)

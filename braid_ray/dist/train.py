"""Diffusion pretraining and BRAID fine-tuning as Ray Train data-parallel runs.

Each worker runs the core loop on its share of the batch; gradients are averaged across workers with an
all-reduce after backward (pretraining through DDP, fine-tuning explicitly, because the sampler calls the
network K times before one backward). Rank 0 writes checkpoints; every rank reports the same
(all-reduced) metrics, as ``ray.train.report`` is a barrier that keeps rank 0's.

Fault tolerance: a run is named after its stage and seed, under the stage's folder of the run directory, so
Ray Train restarts a failed worker group from the last reported checkpoint (up to MAX_FAILURES times), and a
re-submitted job (same run.dir) restores the same run from storage. A non-finite loss is not retried: it
would recur from the same checkpoint; the run stops with the step named and the last good checkpoint kept.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, TrainingFailedError
from ray.train.torch import TorchTrainer, prepare_model
from safetensors.torch import load_file, save_file

from braid_ray.config import Config, from_dict
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser, pretrain
from braid_ray.dist import cluster
from braid_ray.finetune.run import FinetuneJob, build_finetuner, load_trainer_state, trainer_state_files
from braid_ray.finetune.trainer import FineTuner, StepMetrics

log = logging.getLogger(__name__)

MAX_FAILURES = 2  # worker-group restarts per run (each from the last reported checkpoint)


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


def _run_config(name: str, storage_path: str, keep: int | None = None) -> RunConfig:
    return RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=MAX_FAILURES),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep))


def _check_storage(storage_path: str) -> None:
    """Warn when checkpoints would go to one machine's disk on a cluster whose workers run elsewhere."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if "://" not in storage_path and (nodes > 1 or os.environ.get("BRAID_AUTOSCALING") == "1"):
        log.warning("ray: checkpoints go to the local path %s on a multi-node cluster; unless it is a shared "
                    "filesystem mounted on every node, set run.dir to s3://... or gs://...", storage_path)


def _one_line(exc: BaseException) -> str:
    exc = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's own exception
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def _first_cause(error: TrainingFailedError) -> str:
    """The lowest rank's exception (or the controller's), as one line: 'rank 0: ValueError: ...'."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, exc = min(failures.items())
        return f"rank {rank}: {_one_line(exc)}"
    return _one_line(getattr(error, "controller_failure", None) or error)


def fit(trainer: TorchTrainer, what: str, storage_path: str, name: str) -> Result:
    """``trainer.fit()``; a run that failed after its restarts becomes one error naming the run and the cause."""
    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise RuntimeError(
            f"{what} failed on Ray Train (after up to {MAX_FAILURES} restarts): {_first_cause(e)}. The full worker "
            f"logs are in the Ray logs; re-running the same command resumes from the last checkpoint of "
            f"{storage_path}/{name}") from e


def local_dir(checkpoint: Checkpoint) -> Path:
    """The checkpoint as a local directory: itself on local storage, else a downloaded copy (s3://, gs://)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory())


# ---------------------------------------------------------------------------------------------
# Pretraining


def _pretrain_worker(config: dict) -> list[float]:
    cfg, rank, world = _setup_worker(config)
    finished = ray.train.get_checkpoint()
    if finished is not None:  # only the last epoch reports a checkpoint: a re-run after the driver died
        with finished.as_directory() as d:
            if Path(d, "losses.json").is_file():
                return json.loads(Path(d, "losses.json").read_text())
    codes = np.asarray(config["codes"], dtype=np.int8)
    shard = codes[rank::world]
    backbone = build_backbone(cfg.diffusion, codes.shape[1])
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = prepare_model(build_denoiser(cfg.diffusion, codes.shape[1]), move_to_device=False)
    losses: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(loss)
        metrics = _mean_across_ranks({"epoch": float(epoch), "loss": loss})
        if rank == 0:
            log.info("pretrain epoch %d/%d: loss %.4f", epoch, cfg.diffusion.epochs, metrics["loss"])
        if epoch == cfg.diffusion.epochs:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    module = model.module if hasattr(model, "module") else model
                    save_file(module.state_dict(), f"{tmp}/denoiser.safetensors")
                    Path(tmp, "losses.json").write_text(json.dumps(losses))
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(metrics)
        else:
            ray.train.report(metrics)

    return pretrain(model, backbone, shard, cfg.diffusion, cfg.run.seed + 1000 * rank,
                    batch_size=max(1, cfg.diffusion.batch_size // world), on_epoch=on_epoch)


def pretrain_on_ray(cfg: Config, codes: np.ndarray, storage_path: str, name: str) -> tuple[dict, list[float]]:
    """Data-parallel pretraining on Ray Train; returns the denoiser's state dict and the per-epoch losses."""
    cluster.init(cfg.ray)
    _check_storage(storage_path)
    trainer = TorchTrainer(
        _pretrain_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "codes": codes},
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers), run_config=_run_config(name, storage_path))
    result = fit(trainer, "pretraining", storage_path, name)
    with result.checkpoint.as_directory() as d:
        state = load_file(str(Path(d) / "denoiser.safetensors"))
    return state, list(result.return_value)


# ---------------------------------------------------------------------------------------------
# Fine-tuning

STEP_KEYS = [f.name for f in fields(StepMetrics)]


def _synced_step(tuner: FineTuner) -> tuple[dict[str, float], str | None]:
    """One optimizer step on every rank: (metrics averaged over ranks, None) or (_, why the run must stop).

    FineTuner raises FloatingPointError, before its optimizer step, on a non-finite loss or gradient. Whether any
    rank did travels in the metrics all-reduce, so every rank stops at the same step and none is left waiting
    in a collective for one that stopped.
    """
    try:
        values, error = {k: float(v) for k, v in vars(tuner.train_step()).items()}, None
    except FloatingPointError as e:
        values, error = dict.fromkeys(STEP_KEYS, 0.0), str(e)
    values["nonfinite"] = float(error is not None)
    metrics = _mean_across_ranks(values)
    if metrics.pop("nonfinite") > 0:
        return metrics, error or f"fine-tuning step {tuner.step}: non-finite loss or gradient on another worker"
    return metrics, None


def _restore_noise(tuner: FineTuner, directory: Path, rank: int, seed: int) -> None:
    """Give this rank back its own sampler noise stream (trainer_state.pt holds rank 0's generator only).

    Without it every rank would continue rank 0's stream after a restore: the same samples on every worker.
    """
    path = directory / f"noise_rank{rank}.safetensors"
    if path.is_file():
        tuner.generator.set_state(load_file(str(path))["generator"])
    else:  # the checkpoint was written by fewer workers: a fresh stream of this rank's own
        tuner.generator.manual_seed(seed + tuner.step)


def _finetune_worker(config: dict) -> dict:
    cfg, rank, world = _setup_worker(config)
    job = FinetuneJob(**config["job"])
    seed = cfg.run.seed + 7919 * rank
    tuner = build_finetuner(cfg, job, seed=seed, grad_sync=average_gradients)
    checkpoint = ray.train.get_checkpoint()
    history: list[dict] = []
    if checkpoint is not None:  # resume after a worker failure or a re-submitted job
        with checkpoint.as_directory() as d:
            history = load_trainer_state(tuner, Path(d))
            _restore_noise(tuner, Path(d), rank, seed)
        log.info("fine-tune %s: resumed at step %d", job.method, tuner.step)
    ft = cfg.finetune
    while tuner.step < ft.steps:
        metrics, stop = _synced_step(tuner)
        if stop is not None:
            log.error("fine-tune %s: %s", job.method, stop)
            return {"nonfinite": stop}
        history.append(metrics)
        if rank == 0 and (tuner.step % ft.log_every == 0 or tuner.step == ft.steps):
            log.info("fine-tune %s step %d/%d: r_hat %.4f g_hat %.4f KL %.4f objective %.4f", job.method,
                     tuner.step, ft.steps, metrics["r_hat"], metrics["g_hat"], metrics["kl"], metrics["objective"])
        if tuner.step % ft.checkpoint_every == 0 or tuner.step == ft.steps:
            with tempfile.TemporaryDirectory() as tmp:  # every rank's files merge into one checkpoint
                save_file({"generator": tuner.generator.get_state()}, f"{tmp}/noise_rank{rank}.safetensors")
                if rank == 0:
                    for name, data in trainer_state_files(tuner, history).items():
                        Path(tmp, name).write_bytes(data)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    return {}


def finetune_on_ray(cfg: Config, job: FinetuneJob, storage_path: str, name: str) -> Path:
    """Data-parallel fine-tuning on Ray Train; returns the (local) directory of the final checkpoint.

    Re-running with the same ``name`` and storage resumes from the last reported checkpoint. A non-finite loss
    raises FloatingPointError naming the step and the last good checkpoint, which stays in storage.
    """
    cluster.init(cfg.ray)
    _check_storage(storage_path)
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "job": vars(job)},
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers),
        run_config=_run_config(name, storage_path, keep=2))
    result = fit(trainer, f"fine-tune {job.method}", storage_path, name)
    stop = (result.return_value or {}).get("nonfinite")
    if stop:
        where = (f"step {int(result.metrics['step'])}, at {result.checkpoint.path}" if result.checkpoint is not None
                 else "none was written before it")
        raise FloatingPointError(f"fine-tune {job.method}: {stop} ({where}). Lower finetune.lr or finetune.clip, "
                                 "then re-run with run.overwrite=true")
    return local_dir(result.checkpoint)

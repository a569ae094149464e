"""Diffusion pretraining and BRAID fine-tuning as Ray Train data-parallel runs.

Each worker runs the core code on its own device (``ray.train.torch.get_device()``) and its share of the
batch. Pretraining wraps the denoiser in DDP (``prepare_model`` moves it to the device first); fine-tuning
all-reduces the gradients itself after backward, because the sampler calls the network K times before one
backward. The training rows reach the workers through the object store, not inside the config dict.

Fault tolerance: a run is named after its stage and seed, under the stage's folder of the run directory, so
Ray Train restarts a failed worker group from the last reported checkpoint (up to MAX_FAILURES times), and a
re-submitted job (same run.dir) restores the same run from storage. A non-finite loss is not retried: it
would recur from the same checkpoint; every rank stops at that step and the last good checkpoint is kept.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint
from ray.train.torch import TorchTrainer, prepare_model
from safetensors.torch import load_file, save_file

from braid_ray.config import Config
from braid_ray.diffusion.pretrain import (NOISE_KEYS, build_backbone, build_denoiser, load_training_state, pretrain,
                                          training_state_bytes)
from braid_ray.distributed import cluster
from braid_ray.distributed.workers import (MAX_FAILURES, RayTrainSink, average_gradients, check_storage, fit,
                                           local_dir, mean_over_ranks, run_config, setup_worker, synced)
from braid_ray.finetune.loop import NonFiniteStop, drive, tracking_sinks
from braid_ray.finetune.run import (FinetuneJob, build_finetuner, load_trainer_state, read_checkpoint,
                                    trainer_state_files)
from braid_ray.finetune.trainer import FineTuner, StepMetrics
from braid_ray.rundir import RunDir

__all__ = ["MAX_FAILURES", "finetune_on_ray", "pretrain_on_ray"]

log = logging.getLogger(__name__)

TIMING_KEYS = ["step_seconds", "samples_per_second", "peak_memory_mb"]
STEP_KEYS = [f.name for f in fields(StepMetrics)] + TIMING_KEYS


# ---------------------------------------------------------------------------------------------
# Pretraining


def _pretrain_worker(config: dict) -> list[float]:
    w = setup_worker(config)
    cfg = w.cfg
    seed = cfg.run.seed + 1000 * w.rank
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a re-submitted job: go on after the last pass
        with checkpoint.as_directory() as d:
            if Path(d, "losses.json").is_file():  # the last pass's checkpoint: the run had finished
                return json.loads(Path(d, "losses.json").read_text())
            resume = _rank_state(Path(d), w.rank, seed, w.device)
        if w.rank == 0:
            log.info("pretrain: resumed after pass %d", len(resume["losses"]))
    codes = np.array(ray.get(config["codes"]), dtype=np.int8)  # a writable copy of the object store's read-only view
    shard = codes[w.rank::w.world]
    backbone = build_backbone(cfg.diffusion, codes.shape[1])
    # the same initial weights on every rank; prepare_model moves the module to w.device before DDP wraps it
    model = prepare_model(build_denoiser(cfg.diffusion, codes.shape[1], seed=cfg.run.seed))

    def save(state: dict) -> None:
        """After every pass, one merged checkpoint: rank 0's training state (DDP keeps the weights and Adam equal
        on every rank), each rank's own noise streams, and after the last pass the denoiser and the losses."""
        epoch = len(state["losses"])
        metrics = mean_over_ranks({"epoch": float(epoch), "loss": state["losses"][-1]}, w.device)
        if w.rank == 0:
            log.info("pretrain epoch %d/%d: loss %.4f", epoch, cfg.diffusion.epochs, metrics["loss"])
        with tempfile.TemporaryDirectory() as tmp:
            noise = {k: state[k] for k in NOISE_KEYS}
            Path(tmp, f"pretrain_noise_rank{w.rank}.pt").write_bytes(training_state_bytes(noise))
            if w.rank == 0:
                Path(tmp, "pretrain_state.pt").write_bytes(training_state_bytes(state))
            if w.rank == 0 and epoch == cfg.diffusion.epochs:
                save_file({k: v.detach().cpu().contiguous() for k, v in state["model"].items()},
                          f"{tmp}/denoiser.safetensors")
                Path(tmp, "losses.json").write_text(json.dumps(state["losses"]))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    return pretrain(model, backbone, shard, cfg.diffusion, seed, device=w.device,
                    batch_size=_share(cfg.diffusion.batch_size, w.world, "diffusion.batch_size"), save=save,
                    resume=resume)


def _rank_state(directory: Path, rank: int, seed: int, device: torch.device) -> dict:
    """This rank's training state from a pretraining checkpoint: rank 0's weights, Adam, schedule and losses with
    this rank's own noise streams; fresh ones where the checkpoint was written by fewer workers."""
    state = load_training_state((directory / "pretrain_state.pt").read_bytes())
    own = directory / f"pretrain_noise_rank{rank}.pt"
    if own.is_file():
        state.update(load_training_state(own.read_bytes(), NOISE_KEYS))
    else:
        fresh = seed + len(state["losses"])
        state["generator"] = torch.Generator(device=device).manual_seed(fresh).get_state()
        state["rng"] = np.random.default_rng(fresh).bit_generator.state
    return state


def _share(total: int, world: int, key: str) -> int:
    if total % world:
        raise ValueError(f"{key}={total} does not split evenly over {world} Ray workers; make it a multiple of "
                         f"ray.num_workers={world}")
    return total // world


def pretrain_on_ray(cfg: Config, codes: np.ndarray, storage_path: str, name: str) -> tuple[dict, list[float]]:
    """Data-parallel pretraining on Ray Train; returns the denoiser's state dict and the per-epoch losses.

    Every pass reports a checkpoint (rank 0's training state and each rank's noise streams; the last two are
    kept), so a restarted worker group, or a re-run with the same ``name`` and storage, goes on after the last
    finished pass."""
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, storage_path)
    trainer = TorchTrainer(
        _pretrain_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray),
                           "codes": ray.put(np.asarray(codes, dtype=np.int8))},
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers),
        run_config=run_config(name, storage_path, keep=2, ray_logs=cfg.tracking.ray_logs))
    result = fit(trainer, "pretraining", storage_path, name)
    with local_dir(result.checkpoint) as d:
        state = load_file(str(d / "denoiser.safetensors"))
    return state, list(result.return_value)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


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
    w = setup_worker(config)
    cfg, rank = w.cfg, w.rank
    job = FinetuneJob(**config["job"])
    seed = cfg.run.seed + 7919 * rank
    tuner = build_finetuner(cfg, job, seed=seed, device=w.device, world_size=w.world, grad_sync=average_gradients)
    checkpoint = ray.train.get_checkpoint()
    history: list[dict] = []
    if checkpoint is not None:  # resume after a worker failure or a re-submitted job
        with checkpoint.as_directory() as d:
            history = load_trainer_state(tuner, Path(d))
            _restore_noise(tuner, Path(d), rank, seed)
        if rank == 0:
            log.info("fine-tune %s: resumed at step %d", job.method, tuner.step)

    def save(directory: Path) -> None:  # every rank's files merge into one checkpoint
        save_file({"generator": tuner.generator.get_state()}, str(directory / f"noise_rank{rank}.safetensors"))
        if rank == 0:
            for name, data in trainer_state_files(tuner, history).items():
                (directory / name).write_bytes(data)

    run = RunDir(job.run_dir)
    ft = cfg.finetune
    sinks = tracking_sinks(cfg.tracking, str(run.stage("").local_path()) if run.is_local() else None,
                           f"fine-tune {job.method}", f"finetune/{job.method}", ft.steps, ft.log_every, rank)
    try:
        drive(tuner, ft.steps, sinks=[*sinks, RayTrainSink()], save=save, checkpoint_every=ft.checkpoint_every,
              sync=synced(w.device, STEP_KEYS), history=history, world_size=w.world,
              plateau=(ft.plateau_window, ft.plateau_tol))
    except NonFiniteStop as e:
        log.error("fine-tune %s: %s", job.method, e)
        return {"nonfinite": str(e)}
    return {}


def finetune_on_ray(cfg: Config, job: FinetuneJob, storage_path: str, name: str,
                    callbacks: list | None = None) -> tuple[dict, list[dict]]:
    """Data-parallel fine-tuning on Ray Train; returns the final trainable weights and the per-step history.

    Re-running with the same ``name`` and storage resumes from the last reported checkpoint. A non-finite loss
    raises FloatingPointError naming the step and the last good checkpoint, which stays in storage.
    ``callbacks``: Ray Train callbacks, e.g. Tune's TuneReportCallback, which passes every step's report to
    the Tune trial that launched this run (so ASHA can stop it).
    """
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, storage_path)
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "job": vars(job)},
        scaling_config=cluster.scaling(cfg.ray, cfg.ray.num_workers),
        run_config=run_config(name, storage_path, keep=2, callbacks=callbacks, ray_logs=cfg.tracking.ray_logs))
    result = fit(trainer, f"fine-tune {job.method}", storage_path, name)
    stop = (result.return_value or {}).get("nonfinite")
    if stop:
        where = (f"step {int(result.metrics['step'])}, at {result.checkpoint.path}" if result.checkpoint is not None
                 else "none was written before it")
        raise FloatingPointError(f"fine-tune {job.method}: {stop} ({where}). Lower finetune.lr or finetune.clip, "
                                 "then re-run with run.overwrite=true")
    with local_dir(result.checkpoint) as d:
        return read_checkpoint(d)

"""What every Ray Train worker of braid-ray does alike, for sequences and images.

- ``setup_worker``: the config from the worker's dict, torch threads, logging, and the worker's device
  (``ray.train.torch.get_device()``: a GPU with ``ray.use_gpu``, else the CPU). Every model, tensor and
  generator of the worker lives there, because ``use_gpu=True`` makes Ray Train use NCCL, which reduces CUDA
  tensors only.
- ``synced``: the cross-rank mean of a step's metrics, on the worker's device, carrying whether any rank hit
  a non-finite loss, so that every rank stops at the same step.
- ``RayTrainSink``: every step's metrics to ``ray.train.report`` (a barrier every rank calls; Ray keeps rank
  0's), with this rank's checkpoint files on checkpoint steps (Ray merges the ranks' files into one folder).
- ``fit``: ``trainer.fit()`` whose failure is one line naming the run, the rank and the cause.
- ``local_dir``: a reported checkpoint as a local folder (a downloaded copy for s3:// / gs:// run dirs).
- ``check_storage``: a local run.dir on a multi-node or autoscaling cluster stops with the fix.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import (Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig,
                       TrainingFailedError)

from braid_ray.config import Config, RayConfig, from_dict
from braid_ray.finetune.loop import Save

log = logging.getLogger(__name__)

MAX_FAILURES = 2  # worker-group restarts per run (each from the last reported checkpoint)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Worker:
    cfg: Config
    rank: int
    world: int
    device: torch.device


def quiet_logging(show_ray: bool) -> None:
    """braid_ray's own INFO lines on stderr; Ray's INFO lines (e.g. Train's "Reporting training result ...",
    logged through the root logger) only when ``tracking.ray_logs`` asks for them."""
    ours = logging.getLogger("braid_ray")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    # Ray Train sets the worker's root logger to INFO before the train function runs; its per-report lines
    # log through loggers named after Ray's source files, under the root.
    logging.getLogger().setLevel(logging.INFO if show_ray else logging.WARNING)


def setup_worker(config: dict) -> Worker:
    """The worker's config, rank, world size and device, from its train_loop_config (it reads nothing else)."""
    cfg = from_dict(config["cfg"])
    quiet_logging(cfg.tracking.ray_logs)
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over the process group, reduced as a tensor on ``device`` (NCCL: CUDA only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce-average the gradients of ``params`` in place (they live on the parameters' device)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def synced(device: torch.device, keys: list[str]):
    """A ``Sync`` for the driver: every rank's metrics (``keys``, zeros on a rank whose step failed) averaged,
    and the error of the lowest failing rank's kind, or None when every rank's step was finite."""

    def sync(values: dict[str, float], error: str | None) -> tuple[dict[str, float], str | None]:
        full = {k: float(values.get(k, 0.0)) for k in keys} | {"nonfinite": float(error is not None)}
        metrics = mean_over_ranks(full, device)
        if metrics.pop("nonfinite") > 0:
            return metrics, error or "non-finite loss or gradient on another worker"
        return metrics, None

    return sync


class RayTrainSink:
    """Every step to ``ray.train.report`` (all ranks call it: it is a barrier); on checkpoint steps with this
    rank's files, written by ``save`` into a temporary folder that Ray uploads and merges."""

    def report(self, metrics: dict[str, float], save: Save | None) -> None:
        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def close(self) -> None:
        pass


def run_config(name: str, storage_path: str, keep: int | None = None, callbacks: list | None = None,
               ray_logs: bool = False) -> RunConfig:
    """A named run under ``storage_path`` (so a re-submitted job resumes it), restarted up to MAX_FAILURES times
    from its last checkpoint, keeping the last ``keep`` checkpoints; Ray Train's own INFO lines only with
    ``ray_logs`` (``tracking.ray_logs``)."""
    return RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=MAX_FAILURES),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=callbacks,
                     logging_config=LoggingConfig(log_level="INFO" if ray_logs else "WARNING"))


def check_storage(cfg: RayConfig, storage_path: str) -> None:
    """Stop before training when checkpoints would go to one machine's disk on a cluster of several machines (or on
    an autoscaling one, ``ray.autoscaling``, which will have them)."""
    if ("://" in storage_path and not storage_path.startswith("file://")) or cfg.shared_filesystem:
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 or cfg.autoscaling:
        where = f"{nodes} nodes" if nodes > 1 else "an autoscaling cluster"
        raise ValueError(f"run.dir is the local path {storage_path} on {where}: each worker would write its "
                         "checkpoints to its own disk, where the driver cannot read them. Set run.dir to a bucket "
                         "(s3://... or gs://...), or ray.shared_filesystem=true if the path is mounted on every node")


def _one_line(exc: BaseException) -> str:
    exc = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's own exception
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


def first_cause(error: TrainingFailedError) -> str:
    """The lowest rank's exception (or the controller's), as one line: 'rank 0: ValueError: ...'."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, exc = min(failures.items())
        return f"rank {rank}: {_one_line(exc)}"
    return _one_line(getattr(error, "controller_failure", None) or error)


def fit(trainer, what: str, storage_path: str, name: str) -> Result:
    """``trainer.fit()``; a run that failed after its restarts becomes one error naming the run and the cause."""
    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise RuntimeError(
            f"{what} failed on Ray Train (after up to {MAX_FAILURES} restarts): {first_cause(e)}. The full worker "
            f"logs are in the Ray logs; re-running the same command resumes from the last checkpoint of "
            f"{storage_path}/{name}") from e


@contextmanager
def local_dir(checkpoint: Checkpoint) -> Iterator[Path]:
    """The checkpoint as a local folder for the ``with`` block: itself on local storage, else a downloaded copy
    (s3://, gs://) that is removed afterwards."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    tmp = tempfile.mkdtemp(prefix="braid-checkpoint-")
    try:
        yield Path(checkpoint.to_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

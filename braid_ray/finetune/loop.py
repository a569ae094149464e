"""The one fine-tuning driver: resume -> step -> sync -> report -> checkpoint -> history.

Every place a fine-tuner runs uses it: in this process, as a rank of a Ray Train run, inside a Tune trial, and
for Stable Diffusion under DeepSpeed (whose engine the ImageFineTuner's ``train_step`` owns). What differs
between those places is passed in: ``sync`` (the cross-rank mean of the step's metrics, and whether any rank
hit a non-finite loss), ``save`` (this rank's checkpoint files) and the ``sinks`` that receive every step's
metrics (progress lines, Ray Train's or Tune's report, TensorBoard, MLflow).
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from braid_ray.config import Config, TrackingConfig, later_defaults
from braid_ray.rundir import Stage

log = logging.getLogger(__name__)

# Writes this rank's files of a resumable checkpoint into a directory.
Save = Callable[[Path], None]
# (this rank's metrics, this rank's error or None) -> (metrics averaged over ranks, why every rank must stop or None)
Sync = Callable[[dict[str, float], "str | None"], tuple[dict[str, float], "str | None"]]


class Sink(Protocol):
    """Receives every step's (rank-averaged) metrics; ``save`` is given on checkpoint steps only."""

    def report(self, metrics: dict[str, float], save: Save | None) -> None: ...

    def close(self) -> None: ...


class Steppable(Protocol):
    step: int
    batch_size: int
    grad_accum: int
    device: torch.device

    def train_step(self): ...


class NonFiniteStop(FloatingPointError):
    """A non-finite loss or gradient on some rank: every rank stops at the same step, the last good checkpoint
    is kept, and the run is not retried (it would recur from the same checkpoint)."""


def local_sync(values: dict[str, float], error: str | None) -> tuple[dict[str, float], str | None]:
    return values, error


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA memory allocated on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def plateaued(history: list[dict], window: int, tol: float) -> bool:
    """The plateau rule: stop once the objective has confidently stopped improving, i.e. the mean objective of
    the last ``window`` steps exceeds that of the ``window`` steps before by less than ``tol`` even at two
    standard errors of that difference (objective in z-units of y; rank-averaged, so every rank agrees). The
    objective of a batch is noisy: without the standard error a slow start (small gains under a larger noise)
    looks like a plateau and the run stops before the policy has moved. Off when ``window`` is 0. A pure
    function of the history, so a resumed run decides as the uninterrupted one did."""
    if window <= 0 or len(history) < 2 * window:
        return False
    last = np.array([h["objective"] for h in history[-window:]], dtype=np.float64)
    before = np.array([h["objective"] for h in history[-2 * window:-window]], dtype=np.float64)
    se = math.sqrt((last.var(ddof=1) + before.var(ddof=1)) / window) if window > 1 else 0.0
    return bool(last.mean() - before.mean() + 2.0 * se < tol)


def drive(tuner: Steppable, steps: int, *, sinks: list[Sink], save: Save | None = None, checkpoint_every: int = 0,
          sync: Sync = local_sync, history: list[dict] | None = None, world_size: int = 1,
          plateau: tuple[int, float] = (0, 0.0)) -> list[dict]:
    """Train ``tuner`` from its current step until ``steps`` or the plateau rule (``plateau`` = (window, tol));
    returns the per-step history (extended in place).

    Every step's metrics (the tuner's, plus ``step_seconds``, ``samples_per_second`` over all ranks and
    ``peak_memory_mb`` of this rank) go through ``sync`` and then to every sink; every ``checkpoint_every``
    steps and at the last step the sinks also get ``save``. Raises NonFiniteStop when any rank's step
    was not finite.
    """
    history = [] if history is None else history
    samples = tuner.batch_size * tuner.grad_accum * world_size
    while tuner.step < steps and not plateaued(history, *plateau):
        start = time.perf_counter()
        try:
            values, error = {k: float(v) for k, v in asdict(tuner.train_step()).items()}, None
        except FloatingPointError as e:  # raised before the optimizer step: the weights are still good
            values, error = {}, str(e)
        seconds = time.perf_counter() - start
        values |= {"step_seconds": seconds, "samples_per_second": samples / seconds if seconds > 0 else math.nan,
                   "peak_memory_mb": peak_memory_mb(tuner.device)}
        metrics, stop = sync(values, error)
        if stop is not None:
            raise NonFiniteStop(stop)
        history.append(metrics)
        last = tuner.step == steps or plateaued(history, *plateau)
        at_checkpoint = checkpoint_every > 0 and (tuner.step % checkpoint_every == 0 or last)
        for sink in sinks:
            sink.report(metrics, save if at_checkpoint else None)
    for sink in sinks:
        sink.close()
    return history


def run_summary(history: list[dict], alpha: float, plateau: tuple[int, float] = (0, 0.0)) -> dict:
    """What a finished fine-tuning run says about BRAID's objective: how far the conservative reward moved and
    what that cost in KL. alpha must bind: ``alpha_kl`` (z-units) beside ``reward_gain`` (z-units; the
    conservative reward (r_hat - g_hat) / std_y, mean of the last ``window`` steps minus the first step). If
    alpha_kl is a tiny fraction of the gain, the result reflects the optimiser's step budget, not the
    regularised optimum."""
    if not history:
        return {}
    window = max(1, min(plateau[0] or 10, len(history)))
    tail = history[-window:]

    def mean(key: str, rows: list[dict]) -> float:
        return sum(h[key] for h in rows) / len(rows)

    conservative = [h["objective"] + alpha * h["kl"] for h in history]  # mean((r_hat - g_hat) / std_y)
    gain = sum(conservative[-window:]) / window - conservative[0]
    kl = mean("kl", tail)
    return {"steps_run": len(history), "stopped": "plateau" if plateaued(history, *plateau) else "step cap",
            "reward_gain_z": gain, "alpha_kl_z": alpha * kl, "kl": kl, "kl_early": mean("kl_early", tail),
            "alpha_kl_share": alpha * kl / gain if gain > 0 else math.nan, "objective": mean("objective", tail)}


# finetune keys that change how a run is shown, not its result (left out of the stage record)
FINETUNE_RUN_KEYS = ("methods", "log_every")


def finetune_record_drop(cfg: Config) -> tuple[str, ...]:
    """The finetune keys a fine-tuning stage's record leaves out for ``cfg``: the run keys, and the later keys
    at their defaults (so stages recorded before those keys existed keep their fingerprints)."""
    return FINETUNE_RUN_KEYS + later_defaults(cfg.section("finetune")["finetune"])


def write_finetune_summary(cfg: Config, stage: Stage, method: str, history: list[dict], seconds: float) -> dict:
    """The method's ``summary.json`` (run_summary of its history, with the run's time and last step), logged."""
    ft = cfg.finetune
    outcome = run_summary(history, ft.alpha, (ft.plateau_window, ft.plateau_tol))
    stage.write_json("summary.json", {"method": method, "seconds": seconds, **outcome,
                                      "final": history[-1] if history else {}})
    if outcome:
        log.info("fine-tune %s: done in %.1f s, %d steps (%s); conservative reward gain %+.3f z, alpha * KL %.3f z "
                 "(KL %.1f nats, %.1f of them before the last K)", method, seconds, outcome["steps_run"],
                 outcome["stopped"], outcome["reward_gain_z"], outcome["alpha_kl_z"], outcome["kl"],
                 outcome["kl_early"])
    return outcome


class ProgressSink:
    """The user's view of a fine-tuning run: a progress bar on a terminal, a line every ``every`` steps
    otherwise (and always at the last step). Only rank 0 gets one (``tracking_sinks``)."""

    def __init__(self, what: str, steps: int, every: int, bar: bool | None = None):
        self.what, self.steps, self.every = what, steps, max(1, every)
        self.bar = sys.stderr.isatty() if bar is None else bar

    def report(self, metrics: dict[str, float], save: Save | None) -> None:
        step = int(metrics["step"])
        text = (f"{self.what} step {step}/{self.steps}: r_hat {metrics['r_hat']:.4f} g_hat {metrics['g_hat']:.4f} "
                f"KL {metrics['kl']:.4f} objective {metrics['objective']:.4f} "
                f"({metrics['step_seconds']:.2f} s/step)")
        if self.bar:
            done = int(30 * step / max(self.steps, 1))
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}")
            if step == self.steps:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif step % self.every == 0 or step == self.steps:
            log.info("%s", text)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars of every step under ``logdir`` (tensorboardX's writer; no TensorFlow needed)."""

    def __init__(self, logdir: str | Path, prefix: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboardX comes with ray[tune]
            raise ImportError("tracking.tensorboard=true needs tensorboardX (pip install tensorboardX)") from e
        self.writer, self.prefix = SummaryWriter(str(logdir)), prefix

    def report(self, metrics: dict[str, float], save: Save | None) -> None:
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and math.isfinite(value):
                self.writer.add_scalar(f"{self.prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """Every step's metrics to an MLflow run (``tracking.mlflow_uri``); mlflow is an optional extra."""

    def __init__(self, uri: str, experiment: str, run_name: str):
        try:
            import mlflow
        except ImportError as e:
            raise ImportError("tracking.mlflow_uri needs mlflow: pip install 'braid-ray[tracking]'") from e
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)

    def report(self, metrics: dict[str, float], save: Save | None) -> None:
        self.mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step" and math.isfinite(v)},
                                step=int(metrics["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


def tracking_sinks(tracking: TrackingConfig, run_dir_local: str | None, what: str, stage: str, steps: int, log_every: int,
                   rank: int = 0) -> list[Sink]:
    """The sinks ``tracking`` (a TrackingConfig) asks for, on rank 0 only: progress, TensorBoard under
    ``<run_dir_local>/tensorboard/<stage>``, MLflow. Other ranks get none (their metrics are rank 0's)."""
    if rank != 0:
        return []
    bar = {"auto": None, "bar": True, "lines": False}[tracking.progress]
    sinks: list[Sink] = [ProgressSink(what, steps, log_every, bar=bar)]
    if tracking.tensorboard and run_dir_local is not None:
        sinks.append(TensorBoardSink(Path(run_dir_local) / "tensorboard" / stage, "train"))
    if tracking.mlflow_uri:
        sinks.append(MLflowSink(tracking.mlflow_uri, experiment="braid-ray", run_name=f"{stage}"))
    return sinks

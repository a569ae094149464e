"""Pipeline stages: data (the offline protocol), oracle, reward, pretrain, fine-tune, and the conditional models of the
DDOM / CFG baselines; evaluation is in evaluate.py.

Stages that train take a runner (in-process here; Ray Train adapters in braid_ray.distributed).

Each stage records its config and inputs in the run directory and is reused when they are unchanged.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from braid_ray.baselines.conditional import conditional_denoiser, ddom_weights, train_conditional, training_rows
from braid_ray.config import Config
from braid_ray.data.encoding import decode, encode_strings
from braid_ray.data.splits import Splits, check_offline, offline_splits, summarize
from braid_ray.data.tables import Labelled, check_file
from braid_ray.data.tasks import Task, get_task
from braid_ray.devices import resolve_device
from braid_ray.diffusion.pretrain import (build_backbone, build_denoiser, load_training_state, pretrain,
                                          training_state_bytes)
from braid_ray.finetune.run import FinetuneJob, build_finetuner, load_trainer_state, trainer_state_files
from braid_ray.finetune.loop import Save, drive, finetune_record_drop, tracking_sinks, write_finetune_summary
from braid_ray.finetune.trainer import Monitor
from braid_ray.methods import BASELINES
from braid_ray.oracles import SECONDARY, Oracle, build_oracles
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.reward.fit import (RewardData, assemble, calibration, calibration_markdown, reward_data, stack_spec,
                                  train_spec)
from braid_ray.reward.stacked import StackedNet
from braid_ray.reward.train import train_members
from braid_ray.rundir import RunDir, Stage, StageCorrupt, file_sha256, fingerprint, stage_record

log = logging.getLogger(__name__)


@dataclass
class DataResult:
    task: Task
    d: Labelled
    splits: Splits
    summary: dict
    fingerprint: str


def _resolved_data(cfg: Config, task: Task) -> dict:
    q = cfg.data.quantile if cfg.data.quantile is not None else task.default_quantile
    f = cfg.data.oracle_fraction if cfg.data.oracle_fraction is not None else task.default_oracle_fraction
    wild = cfg.data.wild_type
    scan = {} if cfg.data.scan_radius is None else {
        "scan_radius": cfg.data.scan_radius, "wild_type": None if wild is None else wild.upper().replace("U", "T")}
    return {"quantile": q, "oracle_fraction": f, **scan}  # a quantile split's record is what it always was


def make_splits(cfg: Config, d: Labelled, params: dict) -> Splits:
    """The data section's split of D: the quantile split, or the mutational scan."""
    wild_type = params.get("wild_type")
    return offline_splits(d, params["oracle_fraction"], params["quantile"], cfg.run.seed, params.get("scan_radius"),
                          None if wild_type is None else encode_strings([wild_type])[0])


def data_stage(cfg: Config, run: RunDir) -> DataResult:
    """D -> D_ora / D_0 / D_off, written as Parquet with a JSON summary (reused when unchanged)."""
    task = get_task(cfg.task)
    for path in task.input_files():
        check_file(path)
    params = _resolved_data(cfg, task)
    # Inputs by file name and content, not path: under `ray job submit` the bundled tables live in the job's
    # working_dir, whose path changes with every submission (a user table's path is in the task section).
    record = stage_record(cfg, ["task"], data=params, inputs={p.name: file_sha256(p) for p in task.input_files()})
    stage = run.stage("data")

    def reuse() -> DataResult:
        frame = stage.read_parquet("d.parquet")
        d = Labelled(encode_strings(frame["sequence"].tolist()), frame["y"].to_numpy(np.float64), task.name)
        split = frame["split"].to_numpy()
        summary = stage.read_json("summary.json")
        splits = Splits(np.flatnonzero(split == "ora"), np.flatnonzero(split != "ora"),
                        np.flatnonzero(split == "off"), summary["threshold"], params["quantile"],
                        params["oracle_fraction"], summary.get("scan_radius"), summary.get("wild_type_row"))
        return DataResult(task, d, splits, summary, fingerprint(record))

    def make() -> DataResult:
        log.info("data: reading %s", task.description)
        d = task.load()
        splits = make_splits(cfg, d, params)
        check_offline(d, splits, trained_oracle=(cfg.oracle.kind or task.default_oracle) == "trained_cnn")
        summary = {"task": task.name, "description": task.description, **summarize(d, splits)}
        split = np.full(len(d), "above", dtype=object)
        split[splits.ora] = "ora"
        split[splits.off] = "off"
        frame = pd.DataFrame({"row": np.arange(len(d)), "sequence": decode(d.codes), "y": d.y, "split": split})
        stage.write_parquet("d.parquet", frame)
        stage.write_parquet("d_ora.parquet", frame.iloc[splits.ora, :3])
        stage.write_parquet("d_0.parquet", frame.iloc[splits.zero, :3])
        stage.write_parquet("d_off.parquet", frame.iloc[splits.off, :3])
        stage.write_json("summary.json", summary)
        return DataResult(task, d, splits, summary, fingerprint(record))

    return stage.once(record, cfg, make, reuse)


def oracle_stage(cfg: Config, run: RunDir, data: DataResult) -> Oracle:
    """The task's evaluation oracle; a trained one is fitted on D_ora once and cached in the stage."""
    kind = cfg.oracle.kind or data.task.default_oracle
    second = SECONDARY.get(kind) if cfg.oracle.secondary == "auto" else cfg.oracle.secondary
    trained = kind == "trained_cnn" or second in ("trained_cnn", "kmer_ridge")
    record = stage_record(cfg, ["oracle"] if trained else [], {"data": data.fingerprint}, kind=kind,
                          secondary=second)
    stage = run.stage("oracle")

    def build() -> Oracle:
        return build_oracles(data.task, data.d, data.splits, cfg.oracle, cfg.run.seed, stage, kind,
                             cfg.oracle.secondary)

    def make() -> Oracle:
        if kind == "trained_cnn":
            log.info("oracle: training a CNN on D_ora (%d rows)", data.splits.ora.size)
        oracle = build()
        stage.write_json("info.json", {**oracle.info, "oracles": oracle.summary})
        return oracle

    return stage.once(record, cfg, make, build)


# A function that trains every reward member: (config, reward data) -> (stacked net, per-member metrics).
MemberTrainer = Callable[[Config, RewardData], tuple[StackedNet, list[dict]]]


def train_in_process(cfg: Config, data: RewardData) -> tuple[StackedNet, list[dict]]:
    return train_members(data.codes, data.z, list(range(cfg.reward.members)), stack_spec(cfg.reward, data.codes.shape[1]),
                         train_spec(cfg.reward), cfg.run.seed)


def calibration_sets(data: DataResult, rd: RewardData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Held-out D_off rows (in distribution) and D_0 rows the method never trains on (out of distribution)."""
    d, s = data.d, data.splits
    off_codes, off_y = d.codes[s.off], d.y[s.off]
    above = np.setdiff1d(s.zero, s.off)
    y0 = d.y[s.zero]
    top_half = s.zero[y0 >= np.quantile(y0, 0.5)]
    top_1pct = s.zero[y0 >= np.quantile(y0, 0.99)]
    return {"in": (off_codes[rd.holdout], off_y[rd.holdout]), "ood": (d.codes[above], d.y[above]),
            "top_half": (d.codes[top_half], d.y[top_half]), "top_1pct": (d.codes[top_1pct], d.y[top_1pct])}


def reward_stage(cfg: Config, run: RunDir, data: DataResult, trainer: MemberTrainer = train_in_process
                 ) -> ConservativeReward:
    """Train the ensemble on D_off, assemble the conservative reward, write it with its calibration report."""
    stage = run.stage("reward")

    def make() -> ConservativeReward:
        s = data.splits
        rd = reward_data(data.d.codes[s.off], data.d.y[s.off], cfg.reward.holdout_fraction, cfg.run.seed)
        log.info("reward: training %d members on %d D_off rows (%d held out for calibration)", cfg.reward.members,
                 len(rd.codes), rd.holdout.size)
        start = time.perf_counter()
        net, metrics = trainer(cfg, rd)
        train_seconds = time.perf_counter() - start
        reward = assemble(net, rd, cfg.reward)
        stage.write_bytes("reward.safetensors", reward.to_bytes({"members": metrics, "train_seconds": train_seconds,
                                                                "config": cfg.to_dict()}))
        report = calibration(reward, calibration_sets(data, rd), data.d.codes[s.off][rd.holdout][:1000],
                             cfg.run.seed)
        stage.write_json("calibration.json", report)
        stage.write_text("calibration.md", f"# Reward calibration ({data.task.name})\n\n" + calibration_markdown(report))
        stage.write_json("members.json", {"train_seconds": train_seconds, "members": metrics})
        log.info("reward: %d members trained in %.1f s", cfg.reward.members, train_seconds)
        return reward

    return stage.once(stage_record(cfg, ["reward"], {"data": data.fingerprint}), cfg, make,
                      lambda: stage.load("reward.safetensors", ConservativeReward.from_bytes))


# ------------------------------------------------------------------------------------------------
# Diffusion pretraining and fine-tuning

# (config, sequences (N, L), stage) -> (denoiser state dict, per-epoch losses)
PretrainRunner = Callable[[Config, np.ndarray, Stage], tuple[dict, list[float]]]
# (config, job, stage) -> (trainable state dict, per-step history)
FinetuneRunner = Callable[[Config, FinetuneJob, Stage], tuple[dict, list[dict]]]
TRAINING_STATE = "training_state.pt"  # the last finished pass of an in-process pretraining (or conditional model)


def unreadable_checkpoint(cfg: Config, stage: Stage, what: str, error: Exception) -> None:
    """An interrupted run's checkpoint that cannot be read (truncated, or another format): stop, naming it, unless
    run.overwrite is set; then the run starts again."""
    where = f"{stage.run.uri}/{stage.name}"
    if not cfg.run.overwrite:
        raise StageCorrupt(f"{where}: the interrupted run's checkpoint cannot be read ({type(error).__name__}: "
                           f"{error}). Delete {where}, or set run.overwrite=true, to start it again.") from error
    log.warning("%s: starting again (run.overwrite=true): its checkpoint cannot be read (%s)", what, error)


def pass_checkpoints(cfg: Config, stage: Stage, what: str) -> tuple[dict | None, Callable[[dict], None]]:
    """For ``pretrain``'s ``resume`` and ``save``: the training state an interrupted run of ``stage`` left after its
    last finished pass (None: start afresh), and the function that writes one after every pass."""
    resume = None
    if stage.exists(TRAINING_STATE):
        try:
            resume = load_training_state(stage.read_bytes(TRAINING_STATE))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file, whatever the parser says
            unreadable_checkpoint(cfg, stage, what, e)
        else:
            log.info("%s: resumed after pass %d", what, len(resume["losses"]))
    return resume, lambda state: stage.write_bytes(TRAINING_STATE, training_state_bytes(state))


def pretrain_in_process(cfg: Config, codes: np.ndarray, stage: Stage) -> tuple[dict, list[float]]:
    """Pretraining in this process (on ``run.device``), saving its state into ``stage`` after every pass and
    resuming from the last one an interrupted run left."""
    device = resolve_device(cfg.run.device)
    backbone = build_backbone(cfg.diffusion, codes.shape[1])
    model = build_denoiser(cfg.diffusion, codes.shape[1], seed=cfg.run.seed).to(device)
    resume, save = pass_checkpoints(cfg, stage, "pretrain")
    epochs = cfg.diffusion.epochs
    losses = pretrain(model, backbone, codes, cfg.diffusion, cfg.run.seed, device=device, save=save, resume=resume,
                      on_epoch=lambda e, loss: log.info("pretrain epoch %d/%d: loss %.4f", e, epochs, loss))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, losses


def pretrain_stage(cfg: Config, run: RunDir, data: DataResult, runner: PretrainRunner = pretrain_in_process) -> str:
    """Pretrain the diffusion model on every sequence of D (no labels); returns the stage fingerprint."""
    record = stage_record(cfg, ["diffusion"], {"data": data.fingerprint})
    stage = run.stage("pretrain")

    def make() -> str:
        log.info("pretrain: %d sequences, T=%d, %d epochs", len(data.d), cfg.diffusion.steps, cfg.diffusion.epochs)
        start = time.perf_counter()
        state, losses = runner(cfg, data.d.codes, stage)
        stage.write_bytes("denoiser.safetensors", save_safetensors({k: v.contiguous() for k, v in state.items()}))
        seconds = time.perf_counter() - start
        stage.write_json("losses.json", {"epoch_loss": losses, "seconds": seconds})
        log.info("pretrain: done in %.1f s, final loss %.4f", seconds, losses[-1] if losses else float("nan"))
        return fingerprint(record)

    def reuse() -> str:
        stage.load("denoiser.safetensors", load_safetensors)  # a file that cannot be read is named now
        return fingerprint(record)

    return stage.once(record, cfg, make, reuse)


def oracle_monitor(cfg: Config, run_dir: str) -> Monitor | None:
    """The task's oracle from the (finished) data and oracle stages of ``run_dir``, when fine-tuning monitors
    it (``finetune.monitor_queries > 0``): for the r_hat-vs-oracle picture only, never in the loss."""
    if cfg.finetune.monitor_queries == 0:
        return None
    run = RunDir(run_dir)
    return oracle_stage(cfg, run, data_stage(cfg, run)).score


class StageCheckpointSink:
    """Writes the driver's checkpoints into a stage folder of the run directory (in-process fine-tuning)."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def report(self, metrics: dict[str, float], save: Save | None) -> None:
        if save is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            for path in sorted(Path(tmp).iterdir()):
                self.stage.write_bytes(path.name, path.read_bytes())

    def close(self) -> None:
        pass


def finetune_in_process(cfg: Config, job: FinetuneJob, stage: Stage) -> tuple[dict, list[dict]]:
    """The fine-tuning loop in this process (on ``run.device``), checkpointing into ``stage`` and resuming from it."""
    tuner = build_finetuner(cfg, job, seed=cfg.run.seed, device=resolve_device(cfg.run.device),
                            monitor=oracle_monitor(cfg, job.run_dir))
    history: list[dict] = []
    if stage.exists("trainer_state.pt"):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for name in ("trainable.safetensors", "trainer_state.pt", "history.json"):
                    Path(tmp, name).write_bytes(stage.read_bytes(name))
                history = load_trainer_state(tuner, Path(tmp))
            log.info("fine-tune %s: resumed at step %d", job.method, tuner.step)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign checkpoint, whatever the parser says
            unreadable_checkpoint(cfg, stage, f"fine-tune {job.method}", e)
            tuner = build_finetuner(cfg, job, seed=cfg.run.seed, device=resolve_device(cfg.run.device),
                                    monitor=oracle_monitor(cfg, job.run_dir))
            history = []
    ft = cfg.finetune

    def save(directory: Path) -> None:
        for name, blob in trainer_state_files(tuner, history).items():
            (directory / name).write_bytes(blob)

    run = RunDir(job.run_dir)
    sinks = tracking_sinks(cfg.tracking, str(run.stage("").local_path()) if run.is_local() else None,
                           f"fine-tune {job.method}", f"finetune/{job.method}", ft.steps, ft.log_every)
    drive(tuner, ft.steps, sinks=[*sinks, StageCheckpointSink(stage)], save=save,
          checkpoint_every=ft.checkpoint_every, history=history,
          plateau=(ft.plateau_window, ft.plateau_tol))
    return {k: v.detach().cpu() for k, v in tuner.policy.trainable.state_dict().items()}, history


def finetune_stage(cfg: Config, run: RunDir, data: DataResult, method: str, upstream: dict[str, str],
                   runner: FinetuneRunner = finetune_in_process) -> None:
    """Fine-tune the pretrained model with ``method``'s conservative reward; resumes an interrupted run."""
    record = stage_record(cfg, ["finetune", "diffusion"], upstream, drop=finetune_record_drop(cfg), method=method)
    stage = run.stage(f"finetune/{method}")

    def make() -> None:
        job = FinetuneJob(run.uri, method, data.d.length)
        log.info("fine-tune %s: %d steps, batch %d, alpha %g, K=%d of T=%d", method, cfg.finetune.steps,
                 cfg.finetune.batch_size, cfg.finetune.alpha, cfg.finetune.k, cfg.diffusion.steps)
        start = time.perf_counter()
        state, history = runner(cfg, job, stage)
        stage.write_bytes("trainable.safetensors", save_safetensors({k: v.contiguous() for k, v in state.items()}))
        stage.write_parquet("history.parquet", pd.DataFrame(history))
        write_finetune_summary(cfg, stage, method, history, time.perf_counter() - start)

    def reuse() -> None:  # a file that cannot be read is named now, not in the evaluation
        stage.load("trainable.safetensors", load_safetensors)
        stage.read_parquet("history.parquet")

    stage.once(record, cfg, make, reuse)


def conditional_stage(cfg: Config, run: RunDir, data: DataResult, name: str) -> str:
    """Train the conditional denoiser of baseline ``name`` (DDOM: on D_off; CFG: on every sequence of D, labelled
    where it is in D_off; braid_ray/baselines/conditional.py) in this process on ``run.device``, into stage
    ``baselines/<name>``; reused when unchanged (its record holds the training settings, not the sampling grids).
    Returns the stage fingerprint."""
    b = cfg.baselines
    seen = BASELINES[name].data
    training = {"data": seen, "epochs": b.epochs or cfg.diffusion.epochs, "label_dropout": b.label_dropout,
                "reweight": b.reweight and seen == "d_off"}  # reweighting is DDOM's, over D_off's labels
    record = stage_record(cfg, ["diffusion"], {"data": data.fingerprint}, baseline=name, training=training)
    stage = run.stage(f"baselines/{name}")

    def make() -> str:
        codes, labels, mean, std = training_rows(seen, data.d.codes, data.d.y, data.splits.off)
        labelled = int(np.isfinite(labels).sum())
        log.info("baseline %s: a conditional denoiser on %d rows (%d labelled), %d epochs", name, len(codes), labelled,
                 training["epochs"])
        device = resolve_device(cfg.run.device)
        backbone = build_backbone(cfg.diffusion, data.d.length)
        seed = int(np.random.SeedSequence([cfg.run.seed, 21, sorted(BASELINES).index(name)]).generate_state(1)[0])
        model = conditional_denoiser(cfg.diffusion, data.d.length, backbone.in_channels, seed).to(device)
        resume, save = pass_checkpoints(cfg, stage, f"baseline {name}")
        start = time.perf_counter()
        losses = train_conditional(model, backbone, codes, labels, cfg.diffusion, training["epochs"], b.label_dropout,
                                   seed, ddom_weights(labels) if training["reweight"] else None, device,
                                   lambda e, loss: log.info("baseline %s epoch %d/%d: loss %.4f", name, e,
                                                            training["epochs"], loss), save=save, resume=resume)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        stage.write_bytes("denoiser.safetensors", save_safetensors(state))
        stage.write_json("labels.json", {"rows": len(codes), "labelled": labelled, "mean": mean, "std": std,
                                         **training, "epoch_loss": losses, "seconds": time.perf_counter() - start})
        return fingerprint(record)

    def reuse() -> str:
        stage.load("denoiser.safetensors", load_safetensors)  # a file that cannot be read is named now
        stage.read_json("labels.json")
        return fingerprint(record)

    return stage.once(record, cfg, make, reuse)

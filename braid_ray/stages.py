"""Pipeline stages: data (the offline protocol), oracle, reward (its members trained by a pluggable trainer).

Each stage records its config and inputs in the run directory and is reused when they are unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from braid_ray.config import Config
from braid_ray.data.encoding import decode, encode_strings
from braid_ray.data.splits import Splits, offline_splits, summarize
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import Task, get_task
from braid_ray.oracles import Oracle, build_oracle
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.reward.fit import (RewardData, assemble, calibration, calibration_markdown, reward_data, stack_spec,
                                  train_spec)
from braid_ray.reward.stacked import StackedNet
from braid_ray.reward.train import train_members
from braid_ray.rundir import RunDir, file_sha256, fingerprint

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
    return {"quantile": q, "oracle_fraction": f}


def data_stage(cfg: Config, run: RunDir) -> DataResult:
    """D -> D_ora / D_0 / D_off, written as Parquet with a JSON summary (reused when unchanged)."""
    task = get_task(cfg.task)
    for path in task.input_files():
        if not path.is_file():
            raise FileNotFoundError(f"task {task.name}: table not found: {path}")
    params = _resolved_data(cfg, task)
    record = {"task": cfg.section("task")["task"], "data": params, "seed": cfg.run.seed,
              "inputs": {str(p): file_sha256(p) for p in task.input_files()}}
    stage = run.stage("data")
    if stage.begin(record, cfg.run.overwrite):
        log.info("data: reusing %s/data (config and inputs unchanged)", run.uri)
        frame = stage.read_parquet("d.parquet")
        d = Labelled(encode_strings(frame["sequence"].tolist()), frame["y"].to_numpy(np.float64), task.name)
        split = frame["split"].to_numpy()
        summary = stage.read_json("summary.json")
        splits = Splits(np.flatnonzero(split == "ora"), np.flatnonzero(split != "ora"),
                        np.flatnonzero(split == "off"), summary["threshold"], params["quantile"],
                        params["oracle_fraction"])
        return DataResult(task, d, splits, summary, fingerprint(record))

    log.info("data: reading %s", task.description)
    d = task.load()
    splits = offline_splits(d, params["oracle_fraction"], params["quantile"], cfg.run.seed)
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
    stage.write_yaml("config.yaml", cfg.to_dict())
    stage.finish(record)
    return DataResult(task, d, splits, summary, fingerprint(record))


def oracle_stage(cfg: Config, run: RunDir, data: DataResult) -> Oracle:
    """The task's evaluation oracle; a trained one is fitted on D_ora once and cached."""
    kind = cfg.oracle.kind or data.task.default_oracle
    record = {"kind": kind, "data": data.fingerprint, "seed": cfg.run.seed,
              "oracle": cfg.section("oracle")["oracle"] if kind == "trained_cnn" else {}}
    stage = run.stage("oracle")
    reused = stage.begin(record, cfg.run.overwrite)
    if not reused and kind == "trained_cnn":
        log.info("oracle: training a CNN on D_ora (%d rows)", data.splits.ora.size)
    oracle = build_oracle(kind, data.task, data.d, data.splits, cfg.oracle, cfg.run.seed, stage)
    if not reused:
        stage.write_json("info.json", oracle.info)
        stage.write_yaml("config.yaml", cfg.to_dict())
        stage.finish(record)
    return oracle


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
    record = {"reward": cfg.section("reward")["reward"], "data": data.fingerprint, "seed": cfg.run.seed}
    stage = run.stage("reward")
    if stage.begin(record, cfg.run.overwrite):
        log.info("reward: reusing %s/reward (config and data unchanged)", run.uri)
        return ConservativeReward.from_bytes(stage.read_bytes("reward.safetensors"))
    s = data.splits
    rd = reward_data(data.d.codes[s.off], data.d.y[s.off], cfg.reward.holdout_fraction, cfg.run.seed)
    log.info("reward: training %d members on %d D_off rows (%d held out for calibration)", cfg.reward.members,
             len(rd.codes), rd.holdout.size)
    start = time.perf_counter()
    net, metrics = trainer(cfg, rd)
    train_seconds = time.perf_counter() - start
    reward = assemble(net, rd, cfg.reward)
    stage.write_bytes("reward.safetensors", reward.to_bytes({"members": metrics, "train_seconds": train_seconds}))
    report = calibration(reward, calibration_sets(data, rd), data.d.codes[s.off][rd.holdout][:1000], cfg.run.seed)
    stage.write_json("calibration.json", report)
    stage.write_text("calibration.md", f"# Reward calibration ({data.task.name})\n\n" + calibration_markdown(report))
    stage.write_json("members.json", {"train_seconds": train_seconds, "members": metrics})
    stage.write_yaml("config.yaml", cfg.to_dict())
    stage.finish(record)
    log.info("reward: %d members trained in %.1f s", cfg.reward.members, train_seconds)
    return reward

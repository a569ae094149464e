"""Evaluation oracles by name. Each factory returns an Oracle for a task, given D and its splits.

An oracle only ever sees hard sequences at evaluation time; the fine-tuned method never queries it
(except through the explicit, counted oracle budget of hyper-parameter selection).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from braid_ray.config import OracleConfig
from braid_ray.data.encoding import one_hot
from braid_ray.data.splits import Splits
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import ASSETS, Task
from braid_ray.oracles.base import Oracle
from braid_ray.oracles.optimus import Optimus5Prime
from braid_ray.oracles.table import ExactTableOracle
from braid_ray.oracles.trained import TrainedCNNOracle, pearson
from braid_ray.rundir import Stage

OPTIMUS_WEIGHTS = ASSETS / "utr_oracle_optimus5p_castillohair" / "model_optimus5p_multioutput.npz"


class Optimus5PrimeOracle:
    """The pretrained Optimus 5-Prime CNN, HEK293T output (the `rl` scale of Sample et al. 2019)."""

    name = "optimus5p"

    def __init__(self, weights: str | Path = OPTIMUS_WEIGHTS, batch_size: int = 1024):
        self.model = Optimus5Prime.from_npz(weights)
        self.batch_size = batch_size
        self.info = {"kind": self.name, "exact": False, "output": "HEK293T MRL",
                     "note": "pretrained on the full Sample et al. 2019 library (not held out from D); "
                             "used as the ground-truth stand-in, as the paper uses a full-data oracle"}

    def score(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != Optimus5Prime.length:
            raise ValueError(f"Optimus 5-Prime scores 50-nt sequences, got codes of shape {codes.shape}")
        with torch.inference_mode():
            out = [self.model(torch.from_numpy(one_hot(codes[i:i + self.batch_size])))[:, 0]
                   for i in range(0, len(codes), self.batch_size)]
        return torch.cat(out).double().numpy()


def _table(task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int, stage: Stage) -> Oracle:
    return ExactTableOracle(d)


def _optimus(task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int, stage: Stage) -> Oracle:
    if d.length != Optimus5Prime.length:
        raise ValueError(f"oracle.kind=optimus5p scores 50-nt UTRs; task {task.name} has length {d.length}")
    oracle = Optimus5PrimeOracle()
    # Agreement with the measurements on (at most) 5,000 rows: a check of the weights, not a held-out score.
    rows = np.random.default_rng(seed).permutation(len(d))[:5000]
    oracle.info["pearson_vs_measured"] = pearson(oracle.score(d.codes[rows]), d.y[rows])
    oracle.info["pearson_rows"] = int(rows.size)
    return oracle


def _trained(task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int, stage: Stage) -> Oracle:
    if stage.exists("oracle.safetensors") and stage.exists("oracle_info.json"):
        return TrainedCNNOracle.from_bytes(stage.read_bytes("oracle.safetensors"), d.length, cfg,
                                           stage.read_json("oracle_info.json"))
    if splits.ora.size == 0:
        raise ValueError(f"oracle.kind=trained_cnn needs D_ora rows; task {task.name} has "
                         "data.oracle_fraction=0. Set data.oracle_fraction (e.g. 0.5).")
    oracle = TrainedCNNOracle.fit(d.codes[splits.ora], d.y[splits.ora], cfg, seed)
    stage.write_bytes("oracle.safetensors", oracle.to_bytes())
    stage.write_json("oracle_info.json", oracle.info)
    return oracle


OracleFactory = Callable[[Task, Labelled, Splits, OracleConfig, int, Stage], Oracle]
ORACLES: dict[str, OracleFactory] = {"table": _table, "optimus5p": _optimus, "trained_cnn": _trained}


def build_oracle(kind: str, task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int,
                 stage: Stage) -> Oracle:
    if kind not in ORACLES:
        raise ValueError(f"unknown oracle {kind!r}; valid: {sorted(ORACLES)}")
    return ORACLES[kind](task, d, splits, cfg, seed, stage)


__all__ = ["ORACLES", "Oracle", "ExactTableOracle", "Optimus5PrimeOracle", "TrainedCNNOracle", "build_oracle"]

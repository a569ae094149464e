"""Evaluation oracles by name. Each factory returns an Oracle for a task, given D and its splits.

An oracle only ever sees hard sequences at evaluation time; the fine-tuned method never queries it
(except through the explicit, counted oracle budget of hyper-parameter selection).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from braid_ray.config import OracleConfig, OracleName
from braid_ray.data.encoding import one_hot
from braid_ray.data.splits import Splits
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import ASSETS, Task
from braid_ray.eval.stats import pearson
from braid_ray.oracles.agreement import OracleSet, agreement, heldout_agreement, method_agreement
from braid_ray.oracles.base import Oracle
from braid_ray.oracles.kmer import (LAMBDAS, KmerRidgeOracle, data_digest, default_features, heldout_split,
                                    settings_digest)
from braid_ray.oracles.optimus import Optimus5Prime
from braid_ray.oracles.table import ExactTableOracle
from braid_ray.oracles.trained import TrainedCNNOracle
from braid_ray.rundir import Stage, fingerprint

log = logging.getLogger(__name__)

OPTIMUS_WEIGHTS = ASSETS / "utr_oracle_optimus5p_castillohair" / "model_optimus5p_multioutput.npz"


class Optimus5PrimeOracle:
    """The pretrained Optimus 5-Prime CNN, HEK293T output (the `rl` scale of Sample et al. 2019)."""

    name = "optimus5p"

    def __init__(self, weights: str | Path = OPTIMUS_WEIGHTS, batch_size: int = 1024):
        self.model = Optimus5Prime.from_npz(weights)
        self.batch_size = batch_size
        self.info = {"kind": self.name, "exact": False, "output": "HEK293T MRL",
                     "note": "pretrained on the full Sample et al. 2019 library (not held out from D); "
                             "used as the ground-truth stand-in, as the paper uses a full-data oracle",
                     "shares_data_with_reward": True, "family": "CNN"}

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


KMER_FILE, KMER_INFO = "kmer_ridge.safetensors", "kmer_ridge_info.json"
AGREEMENT_FILE = "oracle_agreement.json"  # both oracles on D_ora's validation rows


def _kmer_ridge(task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int, stage: Stage) -> Oracle:
    """Ridge regression on k-mer features, fitted on D_ora once and cached (reused only for the same rows
    and settings, whichever stage folder holds it)."""
    if splits.ora.size == 0:
        raise ValueError(f"oracle kmer_ridge needs D_ora rows; task {task.name} has data.oracle_fraction=0. "
                         "Set data.oracle_fraction (e.g. 0.5).")
    codes, y = d.codes[splits.ora], d.y[splits.ora]
    features = default_features(d.length)
    key = settings_digest(features, LAMBDAS, cfg.val_fraction, seed) + data_digest(codes, y)
    if stage.exists(KMER_FILE) and stage.exists(KMER_INFO):
        info = stage.read_json(KMER_INFO)
        if info.get("cache_key") == key:
            return KmerRidgeOracle.from_bytes(stage.read_bytes(KMER_FILE), info)
        log.info("oracle: the cached k-mer ridge was fitted on other rows or settings; fitting it again")
    log.info("oracle: fitting a k-mer ridge regression on D_ora (%d rows)", splits.ora.size)
    oracle = KmerRidgeOracle.fit(codes, y, seed, cfg.val_fraction, features)
    oracle.info["cache_key"] = key
    stage.write_bytes(KMER_FILE, oracle.to_bytes())
    stage.write_json(KMER_INFO, oracle.info)
    return oracle


OracleFactory = Callable[[Task, Labelled, Splits, OracleConfig, int, Stage], Oracle]
# Keys: config.OracleName, which config validation checks oracle.kind and oracle.secondary against.
ORACLES: dict[OracleName, OracleFactory] = {"table": _table, "optimus5p": _optimus, "trained_cnn": _trained,
                                            "kmer_ridge": _kmer_ridge}

# The independent oracle reported beside a primary that shares data with the reward (secondary="auto").
# Optimus 5-Prime was trained on the whole library D comes from, D_off included. An exact table needs no
# second opinion, and a trained_cnn already sees D_ora only.
SECONDARY: dict[OracleName, OracleName | None] = {"optimus5p": "kmer_ridge", "table": None, "trained_cnn": None,
                                    "kmer_ridge": None}


def build_oracle(kind: str, task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int,
                 stage: Stage) -> Oracle:
    if kind not in ORACLES:
        raise ValueError(f"unknown oracle {kind!r}; valid: {sorted(ORACLES)}")
    return ORACLES[kind](task, d, splits, cfg, seed, stage)


def build_oracles(task: Task, d: Labelled, splits: Splits, cfg: OracleConfig, seed: int, stage: Stage,
                  primary: str | None = None, secondary: str | None = "auto") -> OracleSet:
    """The primary oracle (``primary``, else ``cfg.kind``, else the task's) and a secondary one, both built
    (or loaded from ``stage``) once, with their agreement on D_ora's validation rows.

    ``secondary``: an oracle name, ``"auto"`` (``SECONDARY[primary]``: an independent oracle wherever the
    primary shares data with the reward) or None. Under "auto", a task with no D_ora rows gets no
    secondary (the reason is in ``OracleSet.why_no_secondary``); a named secondary that cannot be built
    raises.
    """
    kind = primary or cfg.kind or task.default_oracle
    main = build_oracle(kind, task, d, splits, cfg, seed, stage)
    if secondary == "auto":
        second = SECONDARY.get(kind)
        if second is None:
            return OracleSet(main, why_no_secondary=f"{kind} does not share data with the reward")
        if splits.ora.size == 0:
            log.warning("oracle: no D_ora rows, so no independent %s oracle beside %s "
                        "(set data.oracle_fraction > 0 to get one)", second, kind)
            return OracleSet(main, why_no_secondary="no D_ora rows (data.oracle_fraction=0)")
    elif secondary is None:
        return OracleSet(main, why_no_secondary="none asked for")
    else:
        second = secondary
    if second == kind:
        raise ValueError(f"the secondary oracle must differ from the primary, both are {kind!r}")
    oracles = OracleSet(main, build_oracle(second, task, d, splits, cfg, seed, stage))
    if splits.ora.size:
        # The secondary's own validation rows (the trained CNN uses the same seeded split of D_ora). Cached:
        # scoring them with a CNN takes a while, and every stage that needs the oracle builds it again.
        val, _ = heldout_split(splits.ora.size, cfg.val_fraction, seed)
        rows = splits.ora[val]
        key = fingerprint([kind, main.info, second, oracles.secondary.info, data_digest(d.codes[rows], d.y[rows])])
        if stage.exists(AGREEMENT_FILE) and stage.read_json(AGREEMENT_FILE).get("cache_key") == key:
            oracles.heldout = stage.read_json(AGREEMENT_FILE)["heldout"]
        else:
            oracles.heldout = heldout_agreement(oracles, d.codes[rows], d.y[rows])
            stage.write_json(AGREEMENT_FILE, {"cache_key": key, "heldout": oracles.heldout})
    return oracles


__all__ = ["ORACLES", "SECONDARY", "Oracle", "OracleSet", "ExactTableOracle", "KmerRidgeOracle",
           "Optimus5PrimeOracle", "TrainedCNNOracle", "agreement", "build_oracle", "build_oracles",
           "method_agreement"]

"""One sweep trial without Ray: fine-tune from the shared upstream models, then spend the oracle budget.

The trial reports the conservative objective after every step but the last (what early stopping may act on;
with Ray Train workers those reports come from the Train run, see ``braid_ray.distributed.tune``) and, once,
its final metrics with the oracle scores of ``budget`` final samples (what selection uses). The oracle is
queried only there, exactly ``budget`` times per trial.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from braid_ray.config import Config
from braid_ray.devices import resolve_device
from braid_ray.eval import distinct
from braid_ray.evaluate import reference_check, sample_codes, selection_reference, selection_scores, selection_seed
from braid_ray.finetune.run import FinetuneJob, build_finetuner, load_reward, load_trainer_state, trainer_state_files
from braid_ray.finetune.loop import Save, drive
from braid_ray.finetune.trainer import FineTuner
from braid_ray.methods import METHODS
from braid_ray.oracles import Oracle
from braid_ray.reward.fit import score
from braid_ray.rundir import RunDir
from braid_ray.stages import DataResult, data_stage, oracle_stage
from braid_ray.sweep.spec import METRIC, OBJECTIVE

FINAL_FILE = "final.json"  # in a trial's last checkpoint: its final report
# Training metrics every report carries (the last step's, for the final report).
TRAIN_KEYS = ("step", OBJECTIVE, "r_hat", "g_hat", "kl")
# (trial config, job) -> (trainable state dict, per-step history): fine-tuning outside this process (Ray Train).
RemoteFinetune = Callable[[Config, FinetuneJob], tuple[dict, list[dict]]]


class TrialReporter(Protocol):
    """Where a trial sends its metrics and checkpoints (Ray Tune, in a sweep)."""

    def checkpoint_files(self) -> dict[str, bytes] | None:
        """The files of the trial's last checkpoint, if it is being resumed."""
        ...

    def report(self, metrics: dict[str, float], files: dict[str, bytes] | None = None) -> None:
        ...


def load_upstream(base: Config) -> tuple[DataResult, Oracle]:
    """The data splits and the oracle of the base run directory (stages reused, never recomputed here)."""
    run = RunDir(base.run.dir)
    data = data_stage(base, run)
    return data, oracle_stage(base, run, data)


def sweep_reference(base: Config) -> dict:
    """The validity rule and worst offline design every trial's selection designs are judged by
    (``selection_reference``), from the base run directory; made once per sweep, by the driver."""
    data, oracle = load_upstream(base)
    return selection_reference(base, RunDir(base.run.dir), data, oracle)


def spend_budget(tuner: FineTuner, cfg: Config, run_dir: str, method: str, oracle: Oracle, budget: int,
                 reference: dict, reference_codes: np.ndarray) -> dict[str, float]:
    """Sample ``budget`` hard designs from the tuner's policy and score them: the oracle's ``budget`` queries,
    their validity under ``reference`` (``sweep_reference``; D = ``reference_codes``), and r_hat / g_hat of the
    same designs (drawn from the selection stream of ``run.seed``, apart from the designs the evaluation scores).
    The trial's METRIC is the evaluation's selection score: the mean with each invalid design counted as the worst
    offline design; ``oracle_mean`` is the plain mean."""
    policy = tuner.policy if tuner.device.type == "cpu" else copy.deepcopy(tuner.policy).cpu()
    # on the CPU: the same designs on any device
    codes, _ = sample_codes(policy, budget, budget, selection_seed(cfg.run.seed))
    oracle_scores = oracle.score(codes)
    assert oracle_scores.shape == (budget,)
    valid = reference_check(reference, reference_codes, policy.backbone, policy.pretrained)(codes)
    selection = selection_scores(oracle_scores, valid, reference["worst_offline"])
    penalty = METHODS[method].penalty
    r_hat, g_hat = score(load_reward(run_dir, penalty, cfg.finetune.strength), codes, penalty)
    return {METRIC: selection["selection_score"], "oracle_mean": selection["selection_score_raw"],
            "valid_share": selection["selection_valid_share"], "oracle_std": float(np.std(oracle_scores)),
            "oracle_max": float(np.max(oracle_scores)), "oracle_queries": int(budget),
            "sample_r_hat": float(np.mean(r_hat)), "sample_g_hat": float(np.mean(g_hat)),
            "distinct": distinct(codes)}


def train_metrics(m: dict) -> dict[str, float]:
    """A step's report: TRAIN_KEYS of the fine-tuner's metrics ``m``, and the oracle keys without a value.

    The oracle keys are present (NaN, 0 queries) in every report, so the rows line up and a searcher that
    optimises the oracle score sees the key (Tune requires it in every result); before the budget is spent it
    has no value."""
    return {k: float(m[k]) for k in TRAIN_KEYS} | {METRIC: math.nan, "oracle_queries": 0}


class _TrialSink:
    """Every in-trial step but the last to the trial's reporter (the final report carries the last), with the
    checkpoint files on checkpoint steps."""

    def __init__(self, reporter: TrialReporter, steps: int):
        self.reporter, self.steps = reporter, steps

    def report(self, metrics: dict[str, float], save: Save | None) -> None:
        if int(metrics["step"]) >= self.steps:
            return
        files = None
        if save is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save(Path(tmp))
                files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        self.reporter.report(train_metrics(metrics), files)

    def close(self) -> None:
        pass


def _train_in_trial(tuner: FineTuner, cfg: Config, reporter: TrialReporter, files: dict[str, bytes] | None
                    ) -> list[dict]:
    """The fine-tuning loop from checkpoint ``files`` (if any), reporting every step."""
    history: list[dict] = []
    if files is not None:  # resumed after an interruption
        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in files.items():
                Path(tmp, name).write_bytes(blob)
            history = load_trainer_state(tuner, Path(tmp))

    def save(directory: Path) -> None:
        for name, blob in trainer_state_files(tuner, history).items():
            (directory / name).write_bytes(blob)

    ft = cfg.finetune
    return drive(tuner, ft.steps, sinks=[_TrialSink(reporter, ft.steps)], save=save,
                 checkpoint_every=ft.checkpoint_every, history=history,
                 plateau=(ft.plateau_window, ft.plateau_tol))


def run_trial(cfg: Config, base: Config, budget: int, reference: dict, reporter: TrialReporter,
              remote: RemoteFinetune | None = None) -> dict[str, float]:
    """Fine-tune ``cfg``'s one method on the base run's reward and pretrained model, in this process or with
    ``remote`` (Ray Train), then spend ``budget`` oracle queries on its final samples; returns the final report.
    In this process it trains on ``run.device`` (a sweep sets ``cuda`` for trials that reserved a GPU).

    A trial resumed after it finished (Tune's experiment state can lag behind its trials) reports its recorded
    result again: it neither trains nor queries the oracle twice.
    """
    files = reporter.checkpoint_files()
    if files is not None and FINAL_FILE in files:
        final = json.loads(files[FINAL_FILE])
        reporter.report(final)
        return final
    data, oracle = load_upstream(base)
    method = cfg.finetune.methods[0]
    job = FinetuneJob(RunDir(base.run.dir).uri, method, data.d.length)
    if remote is None:
        tuner = build_finetuner(cfg, job, seed=cfg.run.seed, device=resolve_device(cfg.run.device))
        history = _train_in_trial(tuner, cfg, reporter, files)
    else:
        state, history = remote(cfg, job)
        tuner = build_finetuner(cfg, job, seed=cfg.run.seed)  # the trained weights, on the CPU
        tuner.policy.trainable.load_state_dict(state)
    final = train_metrics(history[-1]) | spend_budget(tuner, cfg, job.run_dir, method, oracle, budget, reference,
                                                      data.d.codes)
    final["device"] = tuner.device.type if remote is None else ("cuda" if cfg.ray.use_gpu else "cpu")  # of training
    final["finished_at"] = time.time()  # unix time the budget was spent: unchanged when a sweep resumes
    reporter.report(final, trainer_state_files(tuner, history) | {FINAL_FILE: json.dumps(final).encode()})
    return final


def pretrained_reference(base: Config, budget: int, reference: dict) -> dict[str, float]:
    """The same budget spent on the pretrained model (a fine-tuner at step 0), for the results' reference line."""
    data, oracle = load_upstream(base)
    method = base.finetune.methods[0]
    tuner = build_finetuner(base, FinetuneJob(RunDir(base.run.dir).uri, method, data.d.length), seed=base.run.seed)
    return spend_budget(tuner, base, RunDir(base.run.dir).uri, method, oracle, budget, reference, data.d.codes) | {
        "best_offline_y": float(data.summary["best_offline_y"])}

"""The sweep on Ray Tune: upstream models once, one trial per configuration, results, resume.

Layout under ``<sweep.storage>/<sweep.name>/``: ``tune/`` (Tune's experiment: trials, checkpoints, state),
``train/`` (Ray Train runs of trials with ``ray.num_workers > 0``) and ``results/`` (sweep.json,
trials.parquet / .csv, seeds.csv / .md, heatmap.png, best.yaml, summary.json).

Ray 2.60 runs Train V2, which no longer accepts a trainer inside a Tuner: a trial is a function that either
fine-tunes in its own process (``ray.num_workers=0``, reporting every step with ``tune.report``) or builds a
TorchTrainer through ``finetune_on_ray`` and calls ``fit()``. Tune does not count the Train workers' CPUs, so
the number of concurrent trials is derived here from each trial's whole footprint and the cluster's resources.

Like ``braid_ray.pipeline``, this module imports Ray inside its functions only, so ``braid_ray`` imports
without Ray.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from braid_ray import pipeline
from braid_ray.config import ConfigError, from_dict
from braid_ray.rundir import RunDir, diff_keys, fingerprint
from braid_ray.sweep.results import (best_config_yaml, best_params, score_map, seed_markdown, seed_table,
                                     trials_frame)
from braid_ray.sweep.spec import METRIC, OBJECTIVE, Sweep, trial_config
from braid_ray.sweep.trial import TRAIN_KEYS, pretrained_reference, run_trial

log = logging.getLogger(__name__)

UPSTREAM = ("data", "oracle", "reward", "pretrain")
TRIAL_DRIVER_CPUS = 0.1  # a trial that only drives Train workers (Tune rejects 0 CPUs)
FINAL_KEYS = (*TRAIN_KEYS, METRIC, "oracle_std", "oracle_max", "oracle_queries", "sample_r_hat", "sample_g_hat",
              "distinct", "finished_at")


@dataclass
class SweepOutcome:
    trials: pd.DataFrame  # one row per trial
    seeds: pd.DataFrame  # mean and std over seeds per configuration, best first
    best: dict[str, Any]  # the chosen values of the searched keys (seed excluded)
    summary: dict[str, Any]
    results_uri: str


def sweep_uri(sweep: Sweep) -> str:
    return RunDir(f"{sweep.settings.storage.rstrip('/')}/{sweep.name}").uri


# -------------------------------------------------------------------------------------------------
# Resources


def trial_cpus(sweep: Sweep) -> float:
    if sweep.settings.cpus_per_trial is not None:
        return sweep.settings.cpus_per_trial
    return 1.0 if sweep.base.ray.num_workers == 0 else TRIAL_DRIVER_CPUS


def concurrency(sweep: Sweep, cluster: dict[str, float]) -> int:
    """How many trials may run at once: the setting, capped by what the cluster fits, counting each trial's own
    CPUs plus its Train workers' (which Tune does not see). BRAID_AUTOSCALING=1 lifts the cap."""
    r = sweep.base.ray
    need = {"CPU": trial_cpus(sweep) + (r.num_workers * r.cpus_per_worker if r.num_workers > 0 else 0.0)}
    if r.use_gpu and r.num_workers > 0:
        need["GPU"] = float(r.num_workers)
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    autoscaling = os.environ.get("BRAID_AUTOSCALING", "") == "1"
    if fits < 1 and not autoscaling:
        raise ValueError(f"sweep: one trial needs {need} (sweep.cpus_per_trial, plus ray.num_workers x "
                         f"ray.cpus_per_worker), the cluster has {cluster}; lower them")
    wanted = sweep.settings.max_concurrent_trials
    if wanted is None:
        return max(fits, 1)
    if wanted > fits and not autoscaling:
        log.warning("sweep.max_concurrent_trials=%d: the cluster fits %d trials of %s at once; running %d",
                    wanted, fits, need, fits)
        return fits
    return wanted


# -------------------------------------------------------------------------------------------------
# The trial function (runs in a Tune actor) and its reporter


class _TuneReporter:
    """TrialReporter on Ray Tune: ``tune.report`` with the checkpoint files as a Tune Checkpoint."""

    def checkpoint_files(self) -> dict[str, bytes] | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}

    def report(self, metrics: dict[str, float], files: dict[str, bytes] | None = None) -> None:
        from ray import tune

        if files is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in files.items():
                Path(tmp, name).write_bytes(blob)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def sweep_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial. ``params``: the searched dotted keys; ``setup``: the base config dict, the oracle budget,
    torch threads and the Train storage. Reads nothing else."""
    from ray import tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(setup["threads"])
    cfg = trial_config(setup["base"], params)
    remote = None
    if cfg.ray.num_workers > 0:
        from braid_ray.distributed.train import finetune_on_ray
        from braid_ray.finetune.run import read_checkpoint

        name = tune.get_context().get_trial_id()  # the same name on resume: the Train run resumes too
        remote = lambda c, job: read_checkpoint(finetune_on_ray(c, job, setup["train_storage"], name))  # noqa: E731
    run_trial(cfg, from_dict(setup["base"]), setup["budget"], _TuneReporter(), remote)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# -------------------------------------------------------------------------------------------------
# The tuner


def param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    kinds = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
             "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: kinds[kind](values) for key, spec in sweep.search.items() for kind, values in spec.items()}


def search_parts(sweep: Sweep, max_concurrent: int) -> tuple[Any, Any]:
    """(search algorithm, scheduler): Optuna optimises the oracle score on the budget; ASHA stops on the
    conservative objective, never on the oracle."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    s = sweep.settings
    if s.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(metric=METRIC, mode="max", seed=sweep.base.run.seed),
                                    max_concurrent=max_concurrent)
    else:  # grid and random: Tune's variant generator (seeded, so a random search is reproducible)
        search = BasicVariantGenerator(max_concurrent=max_concurrent, random_state=sweep.base.run.seed)
    if not s.asha.enabled:
        return search, FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t still finishes and spends its budget.
    return search, ASHAScheduler(time_attr="step", metric=OBJECTIVE, mode="max", max_t=sweep.base.finetune.steps,
                                 grace_period=s.asha.grace_period, reduction_factor=s.asha.reduction_factor,
                                 stop_last_trials=False)


def _trainable(sweep: Sweep, uri: str) -> Any:
    from ray import tune

    threads = max(1, int(trial_cpus(sweep))) if sweep.base.ray.num_workers == 0 else 1
    setup = {"base": sweep.base.to_dict(), "budget": sweep.settings.oracle_budget, "threads": threads,
             "train_storage": f"{uri}/train"}
    return tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), {"cpu": trial_cpus(sweep)})


def _tuner(sweep: Sweep, uri: str, max_concurrent: int) -> Any:
    from ray import tune

    trainable = _trainable(sweep, uri)
    experiment = f"{uri}/tune"
    if tune.Tuner.can_restore(experiment):
        log.info("sweep: resuming %s (finished trials are kept, unfinished and errored ones continue)", experiment)
        return tune.Tuner.restore(experiment, trainable, resume_errored=True)
    search, scheduler = search_parts(sweep, max_concurrent)
    return tune.Tuner(
        trainable, param_space=param_space(sweep),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=sweep.settings.num_samples,
                                    reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=uri, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=1)))


def check_record(sweep: Sweep, uri: str) -> None:
    """A resumed sweep must be the same sweep: a changed base config or search space stops with the keys."""
    results = RunDir(uri).stage("results")
    record = sweep.record()
    if results.exists("sweep.json"):
        old = results.read_json("sweep.json")
        if old["fingerprint"] != fingerprint(record):
            changes = "; ".join(diff_keys(old["record"], record)) or "the record changed"
            raise ConfigError(f"sweep {uri} was started with a different sweep file ({changes}); use a new "
                              "sweep.name, or restore the file it was started with")
        return
    results.write_json("sweep.json", {"fingerprint": fingerprint(record), "record": record})


def _rows(grid: Any) -> list[dict]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rows.append({**result.config, **{k: metrics.get(k) for k in FINAL_KEYS},
                     "seconds": metrics.get("time_total_s"),
                     "trial_id": metrics.get("trial_id") or Path(result.path).name,
                     "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"})
    return rows


def run_sweep(sweep: Sweep) -> SweepOutcome:
    """Train the upstream models once, run (or resume) every trial on Ray Tune, write and return the results."""
    import ray

    from braid_ray.distributed import cluster

    start = time.perf_counter()
    uri = sweep_uri(sweep)
    check_record(sweep, uri)
    cluster.init(sweep.base.ray)
    max_concurrent = concurrency(sweep, ray.cluster_resources())
    size = sweep.grid_size()
    log.info("sweep %s: %s trials of %s, up to %d at once, %d oracle queries each; results in %s", sweep.name,
             size if size is not None else sweep.settings.num_samples, sweep.method, max_concurrent,
             sweep.settings.oracle_budget, uri)
    pipeline.run(sweep.base, stages=UPSTREAM)  # reused when unchanged

    grid = _tuner(sweep, uri, max_concurrent).fit()
    keys = list(sweep.search)
    trials = trials_frame(_rows(grid), keys)
    out = RunDir(uri).stage("results")
    out.write_parquet("trials.parquet", trials)
    out.write_text("trials.csv", trials.to_csv(index=False))
    for _, row in trials[trials["status"] == "error"].iterrows():
        log.warning("sweep: trial %s failed: %s", row["trial_id"], row["error"])
    seeds = seed_table(trials, keys)
    best = best_params(seeds, keys)  # a ValueError if no trial spent its budget
    reference = pretrained_reference(sweep.base, sweep.settings.oracle_budget)
    queries = int(trials["oracle_queries"].sum())
    summary = {
        "sweep": sweep.name, "source": sweep.source, "method": sweep.method, "metric": METRIC,
        "oracle_budget_per_trial": sweep.settings.oracle_budget, "oracle_queries_trials": queries,
        "oracle_queries_reference": reference["oracle_queries"],
        "trials": {status: int(n) for status, n in trials["status"].value_counts().items()},
        "best": best, "best_score": {k: float(seeds.iloc[0][k]) for k in (f"{METRIC}_mean", f"{METRIC}_std")},
        "pretrained_reference": reference, "seconds": time.perf_counter() - start,
    }
    out.write_text("seeds.csv", seeds.to_csv(index=False))
    out.write_text("seeds.md", seed_markdown(seeds, keys) + "\n")
    png = score_map(trials, sweep.search, best, reference, f"{sweep.name}: {sweep.method}, mean oracle score of "
                                             f"{sweep.settings.oracle_budget} samples per trial")
    if png is not None:
        out.write_bytes("heatmap.png", png)
    out.write_text("best.yaml", best_config_yaml(sweep, best, seeds, queries))
    out.write_json("summary.json", summary)
    return SweepOutcome(trials, seeds, best, summary, f"{uri}/results")

"""The sweep on Ray Tune: one trial per configuration, results, resume (``braid_ray.pipeline.sweep`` trains the
upstream models once first).

Layout under ``<sweep.storage>/<sweep.name>/``: ``tune/`` (Tune's experiment: trials, checkpoints, state),
``train/`` (Ray Train runs of trials with ``ray.num_workers > 0``) and ``results/`` (sweep.json,
trials.parquet / .csv, seeds.csv / .md, heatmap.png, best.yaml, summary.json).

Ray 2.60 runs Train V2, which no longer accepts a trainer inside a Tuner: a trial is a function that either
fine-tunes in its own process (``ray.num_workers=0``, reporting every step with ``tune.report``) or builds a
TorchTrainer through ``finetune_on_ray`` and calls ``fit()``. The Train workers report every step with
``ray.train.report``; a ``TuneReportCallback`` on the Train run passes each of those reports on to the Tune
trial, so ASHA acts on Train trials as on in-process ones. Tune does not count the Train workers' CPUs, so
the number of concurrent trials is derived from each trial's whole footprint and the cluster's largest size
(``braid_ray.sweep.resources``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from braid_ray.config import ConfigError, from_dict
from braid_ray.distributed import cluster
from braid_ray.rundir import RunDir, diff_keys, fingerprint
from braid_ray.sweep.results import (best_config_yaml, best_params, score_map, seed_markdown, seed_table,
                                     trials_frame)
from braid_ray.sweep.resources import concurrency, trial_device, trial_resources, trial_threads
from braid_ray.sweep.spec import METRIC, OBJECTIVE, Sweep, trial_config
from braid_ray.evaluate import SELECTION_RULE
from braid_ray.sweep.trial import TRAIN_KEYS, pretrained_reference, run_trial, sweep_reference, train_metrics

log = logging.getLogger(__name__)

FINAL_KEYS = (*TRAIN_KEYS, METRIC, "oracle_mean", "valid_share", "oracle_std", "oracle_max", "oracle_queries",
              "sample_r_hat", "sample_g_hat", "distinct", "device", "finished_at")


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


def autoscaler_max_resources() -> dict[str, float] | None:
    """The fully scaled-up cluster's resources as the autoscaler's config gives them, or None where Ray does not
    publish that config.

    Ray 2.60 has no public API for it (ray-project/ray#49501). Ray Train and Ray Data read it from the GCS with
    ``ray._private.state.state.get_max_resources_from_cluster_config()``, which is None unless the platform's
    autoscaler reported its config; the open-source autoscaler does not (ray-project/ray#63012). A private API,
    so any failure means "unknown" and the sweep file's ``sweep.cluster_max`` decides.
    """
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: absent or changed means unknown
        log.debug("sweep: no maximum cluster resources from Ray (%s)", e)
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def max_concurrent_trials(sweep: Sweep) -> int:
    """``resources.concurrency`` on the joined cluster: its current resources, and on an autoscaling cluster
    (``ray.autoscaling``) its maximum from ``sweep.cluster_max`` or the autoscaler."""
    reported_max = autoscaler_max_resources() if sweep.base.ray.autoscaling else None
    return concurrency(sweep, ray.cluster_resources(), reported_max)


# -------------------------------------------------------------------------------------------------
# The trial function (runs in a Tune actor) and its reporter


class _TuneReporter:
    """TrialReporter on Ray Tune: ``tune.report`` with the checkpoint files as a Tune Checkpoint."""

    def checkpoint_files(self) -> dict[str, bytes] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}

    def report(self, metrics: dict[str, float], files: dict[str, bytes] | None = None) -> None:
        if files is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in files.items():
                Path(tmp, name).write_bytes(blob)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


class StepReports(TuneReportCallback):
    """Every step a trial's Train run reports (rank 0's, as ``ray.train.report`` keeps it) to the Tune trial, in
    the rows in-process trials report (``train_metrics``), so that ASHA can stop the trial.

    The last step is left out, as in-process: the trial's final report carries it with the oracle scores, so the
    budget's report arrives once and is the trial's last. Built inside the trial (a Tune session), it runs in
    the Train controller."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if int(metrics[0]["step"]) >= self.steps:
            return
        # without the checkpoint: a Train run resumes from its own storage, not from the Tune trial's
        super().after_report(run_context, [train_metrics(metrics[0])], None)


def sweep_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial. ``params``: the searched dotted keys; ``setup``: the base config dict (with the trials'
    run.device), the oracle budget, the selection reference (validity rule, worst offline design), torch threads
    and the Train storage. Reads nothing else."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(setup["threads"])
    cfg = trial_config(setup["base"], params)
    remote = None
    if cfg.ray.num_workers > 0:
        from braid_ray.distributed.train import finetune_on_ray

        name = tune.get_context().get_trial_id()  # the same name on resume: the Train run resumes too
        callbacks = [StepReports(cfg.finetune.steps)]
        remote = lambda c, job: finetune_on_ray(c, job, setup["train_storage"], name, callbacks)  # noqa: E731
    run_trial(cfg, from_dict(setup["base"]), setup["budget"], setup["reference"], _TuneReporter(), remote)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# -------------------------------------------------------------------------------------------------
# The tuner


def param_space(sweep: Sweep) -> dict[str, Any]:
    kinds = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
             "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: kinds[kind](values) for key, spec in sweep.search.items() for kind, values in spec.items()}


def search_parts(sweep: Sweep, max_concurrent: int) -> tuple[Any, Any]:
    """(search algorithm, scheduler): Optuna optimises the oracle score on the budget; ASHA stops on the
    conservative objective, never on the oracle.

    ``max_concurrent`` trials at once is the search algorithm's own limit: TuneConfig(max_concurrent_trials=...)
    would put Optuna behind the same ConcurrencyLimiter, and is ignored (with a warning) for the variant
    generator, which must keep its seeded random_state."""
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


def _trainable(sweep: Sweep, uri: str, reference: dict) -> Any:
    base = sweep.base.to_dict()
    if sweep.base.ray.num_workers == 0:
        base["run"]["device"] = trial_device(sweep)
    setup = {"base": base, "budget": sweep.settings.oracle_budget, "reference": reference,
             "threads": trial_threads(sweep), "train_storage": f"{uri}/train"}
    return tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), trial_resources(sweep))


def _tuner(sweep: Sweep, uri: str, max_concurrent: int, reference: dict) -> Any:
    trainable = _trainable(sweep, uri, reference)
    experiment = f"{uri}/tune"
    if tune.Tuner.can_restore(experiment):
        log.info("sweep: resuming %s (finished trials are kept, unfinished and errored ones continue; Tune keeps "
                 "the concurrency the sweep started with)", experiment)
        return tune.Tuner.restore(experiment, trainable, resume_errored=True)
    search, scheduler = search_parts(sweep, max_concurrent)
    return tune.Tuner(
        trainable, param_space=param_space(sweep),
        # A reused actor would keep an early-stopped trial's Train run going until the next trial's reset fails.
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=sweep.settings.num_samples,
                                    reuse_actors=sweep.base.ray.num_workers == 0,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=uri, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=1)))


def check_record(sweep: Sweep, uri: str) -> None:
    """A resumed sweep must be the same sweep: a changed base config or search space stops with the keys."""
    results = RunDir(uri).stage("results")
    record = {**sweep.record(), "selection": SELECTION_RULE}  # trials scored by another rule are not resumed
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


def run_sweep(sweep: Sweep, upstream: Callable[[], object]) -> SweepOutcome:
    """Check the sweep's record and start Ray, call ``upstream`` (which trains or reuses the data, reward and
    pretrained stages every trial reads), run (or resume) every trial on Ray Tune, write and return the results."""
    start = time.perf_counter()
    uri = sweep_uri(sweep)
    check_record(sweep, uri)
    cluster.init(sweep.base.ray, sweep.base.tracking.ray_logs)
    max_concurrent = max_concurrent_trials(sweep)
    size = sweep.grid_size()
    log.info("sweep %s: %s trials of %s, up to %d at once, %d oracle queries each; results in %s", sweep.name,
             size if size is not None else sweep.settings.num_samples, sweep.method, max_concurrent,
             sweep.settings.oracle_budget, uri)
    upstream()
    selection = sweep_reference(sweep.base)  # the validity rule and worst offline design every trial is judged by

    grid = _tuner(sweep, uri, max_concurrent, selection).fit()
    keys = list(sweep.search)
    trials = trials_frame(_rows(grid), keys)
    out = RunDir(uri).stage("results")
    out.write_parquet("trials.parquet", trials)
    out.write_text("trials.csv", trials.to_csv(index=False))
    for _, row in trials[trials["status"] == "error"].iterrows():
        log.warning("sweep: trial %s failed: %s", row["trial_id"], row["error"])
    seeds = seed_table(trials, keys)
    best = best_params(seeds, keys)  # a ValueError if no trial spent its budget
    reference = pretrained_reference(sweep.base, sweep.settings.oracle_budget, selection)
    queries = int(trials["oracle_queries"].sum())
    summary = {
        "sweep": sweep.name, "source": sweep.source, "method": sweep.method, "metric": METRIC,
        "oracle_budget_per_trial": sweep.settings.oracle_budget, "oracle_queries_trials": queries,
        "oracle_queries_reference": reference["oracle_queries"],
        "selection": {"rule": SELECTION_RULE, "validity_rule": selection["rule"],
                      "worst_offline": selection["worst_offline"],
                      "oracle_queries_worst_offline": selection["oracle_queries"]},
        "trials": {status: int(n) for status, n in trials["status"].value_counts().items()},
        "best": best, "best_score": {k: float(seeds.iloc[0][k]) for k in (f"{METRIC}_mean", f"{METRIC}_std")},
        "pretrained_reference": reference, "seconds": time.perf_counter() - start,
    }
    out.write_text("seeds.csv", seeds.to_csv(index=False))
    out.write_text("seeds.md", seed_markdown(seeds, keys) + "\n")
    png = score_map(trials, sweep.search, best, reference, f"{sweep.name}: {sweep.method}, selection score of "
                                             f"{sweep.settings.oracle_budget} samples per trial")
    if png is not None:
        out.write_bytes("heatmap.png", png)
    out.write_text("best.yaml", best_config_yaml(sweep, best, seeds, queries))
    out.write_json("summary.json", summary)
    return SweepOutcome(trials, seeds, best, summary, f"{uri}/results")

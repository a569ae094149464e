"""The whole pipeline for one config: data -> oracle -> reward -> pretrain -> fine-tune (each method) -> evaluate.

Every stage is reused when its config and inputs are unchanged, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from braid_ray.config import Config
from braid_ray.methods import BASELINES
from braid_ray.reward.fit import calibration_markdown
from braid_ray.rundir import RunDir, Stage
from braid_ray.stages import (FinetuneRunner, MemberTrainer, PretrainRunner, conditional_stage, data_stage,
                              finetune_in_process, finetune_stage, oracle_stage, pretrain_in_process, pretrain_stage,
                              reward_stage, train_in_process)

if TYPE_CHECKING:
    from braid_ray.distributed.tune import SweepOutcome
    from braid_ray.images.stages import ImageRunners
    from braid_ray.sweep.spec import Sweep

ALL_STAGES = ("data", "oracle", "reward", "pretrain", "finetune", "baselines", "eval")
UPSTREAM = ("data", "oracle", "reward", "pretrain")  # what every fine-tuning run of a task reads

log = logging.getLogger(__name__)


def conditional_baselines(cfg: Config) -> list[str]:
    """The baselines of ``baselines.methods`` that train a conditional model of their own (stage baselines/<name>)."""
    return [m for m in cfg.baselines.methods if BASELINES[m].kind == "conditional"]


def member_trainer(cfg: Config, run_dir: RunDir) -> MemberTrainer:
    """Ray Train workers for the reward members, or in-process when ``ray.num_workers=0``."""
    if cfg.ray.num_workers == 0:
        return train_in_process
    from braid_ray.distributed.reward import train_ensemble  # the core never imports Ray at module level

    storage = str(run_dir.stage("reward").local_path("ray")) if run_dir.is_local() else f"{run_dir.uri}/reward/ray"
    return lambda c, data: train_ensemble(c, data, storage, name=f"reward-seed{c.run.seed}")


def _ray_storage(run_dir: RunDir, stage: str) -> str:
    return str(run_dir.stage(stage).local_path("ray")) if run_dir.is_local() else f"{run_dir.uri}/{stage}/ray"


def pretrain_runner(cfg: Config, run_dir: RunDir) -> PretrainRunner:
    if cfg.ray.num_workers == 0:
        return pretrain_in_process
    from braid_ray.distributed.train import pretrain_on_ray

    # Ray Train keeps its own checkpoints (one per pass) under the stage's ray/ folder, and resumes from them
    return lambda c, codes, _stage: pretrain_on_ray(c, codes, _ray_storage(run_dir, "pretrain"),
                                                    f"pretrain-seed{c.run.seed}")


def finetune_runner(cfg: Config, run_dir: RunDir) -> FinetuneRunner:
    if cfg.ray.num_workers == 0:
        return finetune_in_process
    from braid_ray.distributed.train import finetune_on_ray

    def on_ray(c: Config, job, stage):
        return finetune_on_ray(c, job, _ray_storage(run_dir, f"finetune/{job.method}"), f"{job.method}-seed{c.run.seed}")

    return on_ray


def image_runners(cfg: Config) -> ImageRunners:
    """The image stages' Ray adapters, unless ``ray.num_workers=0`` (then everything runs in this process); the
    evaluation runs as one Ray task per method on GPU clusters only."""
    from braid_ray.images.stages import IN_PROCESS, ImageRunners, evaluate_method

    if cfg.ray.num_workers == 0:
        return IN_PROCESS
    from braid_ray.distributed.image_data import embed_table, evaluate_on_ray, sample_and_embed
    from braid_ray.distributed.images import finetune_images_on_ray

    evaluate = (lambda c, methods: evaluate_on_ray(c, methods, evaluate_method)) if cfg.ray.use_gpu else None
    return ImageRunners(sample_and_embed, embed_table, finetune_images_on_ray, evaluate)


def run(cfg: Config, stages: tuple[str, ...] = ALL_STAGES) -> dict:
    """Run ``stages`` for ``cfg`` (earlier ones reused when unchanged); returns what the launch script prints."""
    run_dir = RunDir(cfg.run.dir)
    with run_dir.lock():  # one run at a time in a run directory
        if cfg.domain == "image":  # Stable Diffusion: its own stages (braid_ray/images/stages.py)
            from braid_ray.images.stages import STAGES, run_images

            return run_images(cfg, tuple(s for s in stages if s in STAGES), image_runners(cfg))
        summary = _run_sequences(cfg, run_dir, stages)
        run_dir.stage("").write_yaml("config.yaml", cfg.to_dict())  # only once every stage has accepted it
        return summary


def _run_sequences(cfg: Config, run_dir: RunDir, stages: tuple[str, ...]) -> dict:
    data = data_stage(cfg, run_dir)
    summary: dict = {"run_dir": run_dir.uri, "data": data.summary}
    if "oracle" in stages or "eval" in stages or cfg.finetune.monitor_queries > 0:  # these need the oracle
        oracle = oracle_stage(cfg, run_dir, data)
        summary["oracle"] = oracle.info
    if "reward" in stages:
        reward_stage(cfg, run_dir, data, member_trainer(cfg, run_dir))
        summary["reward"] = run_dir.stage("reward").read_json("calibration.json")
    if "pretrain" in stages:
        pretrain_stage(cfg, run_dir, data, pretrain_runner(cfg, run_dir))
    if "finetune" in stages:
        upstream = run_dir.fingerprints(["reward", "pretrain"])
        for method in cfg.finetune.methods:
            finetune_stage(cfg, run_dir, data, method, upstream, finetune_runner(cfg, run_dir))
    if "baselines" in stages or "eval" in stages:  # the conditional models DDOM and CFG sample from
        for name in conditional_baselines(cfg):
            conditional_stage(cfg, run_dir, data, name)
    if "eval" in stages:
        from braid_ray.evaluate import evaluate_stage
        from braid_ray.eval import to_markdown

        summary["eval"] = to_markdown(evaluate_stage(cfg, run_dir, data, oracle, cfg.finetune.methods))
    return summary


def sweep(spec: Sweep) -> SweepOutcome:
    """A Ray Tune sweep (``launch/sweep.py``): the base config's upstream stages once (reused when unchanged),
    then one fine-tuning trial per configuration."""
    from braid_ray.distributed.tune import run_sweep

    return run_sweep(spec, upstream=lambda: run(spec.base, stages=UPSTREAM))


def check(cfg: Config) -> str:
    """A dry run: validate the table and the split (the data stage's checks, degenerate data included), say what
    the run directory holds and what the run would need; trains nothing and writes nothing."""
    import math

    from braid_ray.data.splits import check_offline, summarize
    from braid_ray.data.tables import check_file
    from braid_ray.data.tasks import get_task
    from braid_ray.stages import _resolved_data, make_splits

    lines = [f"config      valid ({cfg.domain} domain)"]
    run_dir = RunDir(cfg.run.dir)
    if cfg.domain == "sequence":
        task = get_task(cfg.task)
        for path in task.input_files():
            check_file(path)
        d = task.load()
        params = _resolved_data(cfg, task)
        splits = make_splits(cfg, d, params)
        check_offline(d, splits, trained_oracle=(cfg.oracle.kind or task.default_oracle) == "trained_cnn")
        rows = summarize(d, splits)["rows"]
        lines += [f"task        {task.name}: {task.description}",
                  f"rows        D {rows['D']:,} | D_ora {rows['D_ora']:,} | D_0 {rows['D_0']:,} | D_off {rows['D_off']:,}"
                  f" (sequences of {d.length} letters; D_off = {splits.rule})"]
        df, ft = cfg.diffusion, cfg.finetune
        lines += ["work        reward: {} members x at most {} epochs over {:,} rows".format(
                      cfg.reward.members, cfg.reward.epochs, rows["D_off"]),
                  "            pretrain: {} epochs x {:,} steps of batch {} (T = {})".format(
                      df.epochs, math.ceil(rows["D"] / df.batch_size), df.batch_size, df.steps),
                  "            fine-tune: {} method(s) x at most {} steps of {} samples (K = {} of T = {})".format(
                      len(ft.methods), ft.steps, ft.batch_size, ft.k, df.steps),
                  "            eval: {} designs per method and the pretrained model".format(cfg.eval.n_samples)]
        if cfg.baselines.methods:
            from braid_ray.evaluate import baseline_queries

            trained = conditional_baselines(cfg)
            lines.append("            baselines: {} ({}); {:,} oracle queries choose their settings".format(
                ", ".join(BASELINES[m].label for m in cfg.baselines.methods),
                f"{len(trained)} conditional model(s) x {cfg.baselines.epochs or df.epochs} epochs" if trained
                else "no training", baseline_queries(cfg)))
    r = cfg.ray
    where = ("in this process (ray.num_workers=0) on " + cfg.run.device if r.num_workers == 0 else
             f"{r.num_workers} Ray Train workers x {r.cpus_per_worker:g} CPU" + (" + 1 GPU" if r.use_gpu else "")
             + (" (autoscaling cluster)" if r.autoscaling else ""))
    lines.append(f"resources   {where}")
    per_method = {"finetune": cfg.finetune.methods, "baselines": conditional_baselines(cfg)}
    names = [f"{name}/{m}" if name in per_method else name for name in ALL_STAGES
             for m in per_method.get(name, [None])]
    by_state: dict[str, list[str]] = {}
    for name in names:
        by_state.setdefault(_stage_state(run_dir.stage(name)), []).append(name)
    lines.append(f"run dir     {run_dir.uri}")
    lines += [f"            {state}: {', '.join(stages)}" for state, stages in by_state.items()]
    lines.append("dry run     nothing was trained or written")
    return "\n".join(lines)


def _stage_state(stage: Stage) -> str:
    if stage.exists("stage.json"):
        return "finished (reused when its config is unchanged, else a conflict)"
    if stage.exists("stage.pending.json"):
        return "interrupted (resumes)"
    return "to run"


def _oracle_quality(o: dict) -> str:
    if o.get("exact"):
        return "exact (measured table)"
    if "heldout_pearson" in o:
        return f"held-out Pearson {o['heldout_pearson']:.3f}"
    if "pearson_vs_measured" in o:
        return f"Pearson vs measured {o['pearson_vs_measured']:.3f} (not held out)"
    return ""


def format_summary(summary: dict) -> str:
    if summary.get("domain") == "image":
        from braid_ray.images.stages import format_summary as format_image_summary

        return format_image_summary(summary)
    d = summary["data"]
    rows = d["rows"]
    lines = [
        f"task        {d['task']}: {d['description']}",
        f"run dir     {summary['run_dir']}",
        f"rows        D {rows['D']:,} | D_ora {rows['D_ora']:,} | D_0 {rows['D_0']:,} | D_off {rows['D_off']:,}",
        f"D_off       " + d.get("offline_rule", f"y < {d['threshold']:.4g} (the {d['quantile']:.2f} quantile of y "
                                                 "over D_0)") + (f": {d['wild_type']}" if "wild_type" in d else ""),
        f"best D_off  y = {d['best_offline_y']:.4g}, percentile {d['best_offline_percentile']:.1f} of D",
        f"y over D    min {d['y_full']['min']:.4g} | median {d['y_full']['median']:.4g} | "
        f"max {d['y_full']['max']:.4g}",
    ]
    if "oracle" in summary:
        lines.append(f"oracle      {summary['oracle']['kind']}: {_oracle_quality(summary['oracle'])}")
    if "reward" in summary:
        lines += ["", "reward calibration (in = held-out D_off rows; ood = D_0 rows outside D_off):",
                  calibration_markdown(summary["reward"])]
    if "eval" in summary:
        lines += ["", f"designs scored by the oracle (report: {summary['run_dir']}/eval/report.md):", summary["eval"]]
    return "\n".join(lines)

r"""Sweep BRAID fine-tuning hyper-parameters on Ray Tune; pick the best configuration on an explicit oracle budget.

    python launch/sweep.py --config configs/sweeps/tfbind8_alpha.yaml
    python launch/sweep.py --config configs/sweeps/tfbind8_alpha.yaml sweep.storage=s3://bucket/sweeps
    ray job submit --runtime-env cluster/runtime_env.yaml -- \
        python launch/sweep.py --config configs/sweeps/tfbind8_alpha_cluster.yaml

Overrides: ``sweep.<setting>=value`` changes the sweep's settings, any other ``key=value`` the base config
(e.g. ``finetune.steps=100``). The reward and pretrained model are trained (or reused) once, then each trial
fine-tunes one configuration. Re-running the same command resumes an interrupted sweep: finished trials are
kept, not re-run. Results: <storage>/<name>/results/ (trials.parquet/.csv, seeds.md, heatmap.png, best.yaml).
Trials at once: as many as the cluster fits at its largest (on an autoscaling cluster, ray.autoscaling=true,
from sweep.cluster_max), or sweep.max_concurrent_trials; sweep.gpus_per_trial=0.25 shares a GPU between trials.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from braid_ray import cli, pipeline  # noqa: E402
from braid_ray.config import ConfigError  # noqa: E402
from braid_ray.sweep import load_sweep  # noqa: E402
from braid_ray.sweep.results import seed_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep file (see configs/sweeps/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="sweep.<setting>=v or config key=v")
    args = parser.parse_intermixed_args(argv)
    cli.setup_logging()
    try:
        sweep = load_sweep(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.exit(2, f"config error: {e}\n")
    outcome = pipeline.sweep(sweep)
    s = outcome.summary
    keys = list(sweep.search)
    print(f"sweep {sweep.name}: {s['trials']} ({sweep.method}); oracle queries: {s['oracle_budget_per_trial']} "
          f"per finished trial, {s['oracle_queries_trials']} in all (+{s['oracle_queries_reference']} for the "
          f"pretrained reference, mean {s['pretrained_reference']['oracle_score']:.4g})")
    print(seed_markdown(outcome.seeds.head(10), keys))
    print(f"best: {json.dumps(outcome.best)}  ->  {outcome.results_uri}/best.yaml")
    print(f"results: {outcome.results_uri} ({s['seconds']:.0f} s)")


if __name__ == "__main__":
    cli.run_main(main)

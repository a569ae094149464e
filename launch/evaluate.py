"""Sample N designs per method, score them with the task's oracle, and write the report.

    python launch/evaluate.py run.dir=runs/tfbind8                 # after launch/finetune.py (reuses its stages)
    python launch/evaluate.py --config configs/utr_mrl.yaml eval.n_samples=2000
    python launch/evaluate.py run.dir=runs/tfbind8 "baselines.methods=[ddom,guidance,cfg]"   # the paper's baselines

Runs (or reuses) every earlier stage, then writes eval/report.md, samples.parquet, metrics.json,
designs.fasta and the plots. The oracle never enters a loss: it scores the designs here, and during training only
watches when asked (`finetune.monitor_queries`, counted in each run's history; the image loop logs the
aesthetic oracle's score of every step's training images, for the r_hat-against-oracle curve). The baselines'
knobs are chosen with 64 counted oracle queries per setting on designs drawn apart from the evaluated ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from braid_ray import cli, pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse(__doc__.splitlines()[0], argv)
    print(pipeline.format_summary(pipeline.run(cfg)))


if __name__ == "__main__":
    cli.run_main(main)

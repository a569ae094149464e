"""Run the BRAID pipeline for one config, on a local Ray or the cluster this job was submitted to.

    python launch/finetune.py                                   # the embedded default: TFBind8
    python launch/finetune.py --config configs/utr_mrl.yaml run.dir=runs/utr
    python launch/finetune.py --config configs/utr_mrl.yaml --check   # a dry run: validate, say what it would do
    ray job submit --working-dir . -- python launch/finetune.py --config configs/tfbind8.yaml
    # on the autoscaling clusters of cluster/ (no worker nodes until asked): add ray.autoscaling=true

Stages whose config and inputs are unchanged are reused from run.dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from braid_ray import cli, pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg, args = cli.parse_args(__doc__.splitlines()[0], argv, check_flag=True)
    if args.check:
        print(pipeline.check(cfg))
        return
    summary = pipeline.run(cfg)
    print(pipeline.format_summary(summary))


if __name__ == "__main__":
    cli.run_main(main)

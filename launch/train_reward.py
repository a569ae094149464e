"""Train the conservative reward ensemble on D_off (Ray Train workers, or in-process with ray.num_workers=0).

    python launch/train_reward.py                                  # TFBind8, M=8 members on 2 local workers
    python launch/train_reward.py --config configs/utr_mrl.yaml reward.members=16 ray.num_workers=4

Writes reward/reward.safetensors (every member, one file) and reward/calibration.{json,md} to run.dir;
runs the data stage first if needed. An unchanged reward stage is reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from braid_ray import cli, pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse(__doc__.splitlines()[0], argv)
    print(pipeline.format_summary(pipeline.run(cfg, stages=("data", "reward"))))


if __name__ == "__main__":
    cli.run_main(main)

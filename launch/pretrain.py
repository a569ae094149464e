"""Pretrain the sequence diffusion model on the task's sequences, without labels (Ray Train data-parallel).

    python launch/pretrain.py                                      # TFBind8, 2 local workers
    python launch/pretrain.py --config configs/utr_mrl.yaml ray.num_workers=4 diffusion.epochs=50

Writes pretrain/denoiser.safetensors to run.dir (runs the data stage first if needed); reused when unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from braid_ray import cli, pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse(__doc__.splitlines()[0], argv)
    print(pipeline.format_summary(pipeline.run(cfg, stages=("data", "pretrain"))))


if __name__ == "__main__":
    cli.run_main(main)

"""The tiny end-to-end settings the pipeline, Ray and sweep tests share, so none repeats them.

The task is ``tfbind5``: all 1,024 5-mers, y = the mean of their 64 8-mer extensions in the bundled TFBind8
table, the exact table oracle, no D_ora and D_off = D below its median (``ROWS``). The models are dummy-sized
and train for a step or two, so a whole run takes seconds. The real default (TFBind8, 65,536 rows) runs end to
end in one test marked ``slow`` (tests/test_pipeline.py).
"""

from __future__ import annotations

from braid_ray.config import Config, load_config

TASK = ("task.name=tfbind5",)
LENGTH = 5  # its sequences' length
# Dummy-sized models, a step or two of each; everything in this process unless a test sets ray.num_workers.
MODELS = ("reward.members=2", "reward.epochs=1", "reward.channels=8", "reward.hidden=16", "ray.num_workers=0",
          "diffusion.epochs=1", "diffusion.steps=5", "diffusion.channels=8", "diffusion.blocks=1",
          "diffusion.batch_size=1024", "finetune.k=2", "finetune.steps=2", "finetune.batch_size=8",
          "finetune.methods=[strl,braid_bonus]", "eval.n_samples=32")
FAST = (*TASK, *MODELS)
# D's splits under TASK: the exact oracle needs no D_ora, and D_off is the half of D_0 below the median.
ROWS = {"D": 1_024, "D_ora": 0, "D_0": 1_024, "D_off": 512}
ROWS_LINE = "D 1,024 | D_ora 0 | D_0 1,024 | D_off 512"


def tiny_config(*overrides: str, preset: str | None = None) -> Config:
    """FAST (the models only, when ``preset`` names a task of its own) with ``overrides`` on top."""
    return load_config(preset, [*(MODELS if preset else FAST), *overrides])

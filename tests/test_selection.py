"""Selection spends its oracle budget on designs of its own, never on the designs the evaluation scores."""

from __future__ import annotations

import numpy as np
import torch

from braid_ray.config import DiffusionConfig
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.evaluate import sample_codes, selection_seed


def test_selection_designs_are_drawn_apart_from_the_evaluation_designs() -> None:
    cfg = DiffusionConfig(steps=4, channels=8, blocks=1, emb_dim=8)
    policy = FineTunedPolicy(build_backbone(cfg, 6), build_denoiser(cfg, 6, seed=0), "shift")
    with torch.no_grad():
        for p in policy.trainable.parameters():
            p.normal_(0, 0.1)
    seeds = [selection_seed(s) for s in range(100)]
    assert len(set(seeds) | set(range(100))) == 200  # no run's selection stream is any run's evaluation stream
    evaluated, _ = sample_codes(policy, 64, 16, seed=0)
    again, _ = sample_codes(policy, 64, 16, seed=0)
    chosen, _ = sample_codes(policy, 64, 64, seed=selection_seed(0))
    np.testing.assert_array_equal(evaluated, again)  # the evaluation is reproducible ...
    shared = {r.tobytes() for r in evaluated} & {r.tobytes() for r in chosen}
    assert (evaluated != chosen).any(axis=1).mean() > 0.9  # ... and the selection designs are other draws
    assert len(shared) < 0.5 * len(evaluated), "selection and evaluation share most designs"

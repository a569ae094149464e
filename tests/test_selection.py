"""Selection spends its oracle budget on designs of its own, never on the designs the evaluation scores, and counts
the designs the validity rule calls hacked as failures."""

from __future__ import annotations

import numpy as np
import torch

from braid_ray.config import DiffusionConfig
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.eval import validity_rule
from braid_ray.evaluate import sample_codes, selection_scorer, selection_seed, validity_check


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


class _CountingOracle:
    """Scores the share of T in a design (so poly-T is its best design) and counts its queries."""

    name, info = "share-of-T", {}

    def __init__(self) -> None:
        self.queries = 0

    def score(self, codes: np.ndarray) -> np.ndarray:
        self.queries += len(codes)
        return (codes == 3).mean(1)


def test_the_selection_score_counts_hacked_designs_as_the_worst_offline_design() -> None:
    """An oracle with the reward's blind spot prefers a setting whose designs are mostly poly-T; the selection
    score (each design the validity rule calls hacked scored as the worst offline design) prefers the valid one,
    and both scores spend exactly one query per design."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4, size=(2000, 20)).astype(np.int8)
    rule = validity_rule(data)  # no ELBO part: homopolymer and entropy limits from D
    oracle, worst = _CountingOracle(), 0.0
    select = selection_scorer(oracle, validity_check(rule, data, None), worst)
    valid = rng.integers(0, 4, size=(64, 20)).astype(np.int8)
    hacked = valid.copy()
    hacked[:48] = 3  # 48 of 64 designs are poly-T: the oracle's best designs, and invalid
    a, b = select(valid), select(hacked)
    assert oracle.queries == 128
    assert b["selection_score_raw"] > a["selection_score_raw"]  # the plain mean picks the hacked setting ...
    assert a["selection_score"] > b["selection_score"]  # ... the selection score does not
    assert b["selection_valid_share"] == 16 / 64 and a["selection_valid_share"] == 1.0
    assert a["selection_score"] == a["selection_score_raw"]  # nothing invalid: the two agree
    expected = ((hacked[48:] == 3).mean(1).sum() + 48 * worst) / 64
    assert np.isclose(b["selection_score"], expected)

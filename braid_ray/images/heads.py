"""Fitting the conservative reward heads on an offline table of (CLIP embedding, score).

This is the sequence path's reward stage with MLP members: the same bootstrap members, whitening, bonus
factor and penalty scales (``braid_ray.reward``), trained on the rows of D_off.
"""

from __future__ import annotations

import logging

import numpy as np

from braid_ray.config import RewardConfig
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.reward.fit import RewardData, assemble, mlp_spec, reward_data, train_spec
from braid_ray.reward.train import train_members

log = logging.getLogger(__name__)


def fit_reward_heads(cfg: RewardConfig, embeddings: np.ndarray, y: np.ndarray, seed: int
                     ) -> tuple[ConservativeReward, RewardData, list[dict]]:
    """Train ``cfg.members`` MLP members on embeddings (N, D) with labels y (N,) of D_off; assemble r_hat - g_hat."""
    if embeddings.ndim != 2 or len(embeddings) != len(y):
        raise ValueError(f"expected embeddings (N, D) and y (N,), got {embeddings.shape} and {np.shape(y)}")
    rd = reward_data(embeddings.astype(np.float32), np.asarray(y, dtype=np.float64), cfg.holdout_fraction, seed)
    net, metrics = train_members(rd.codes, rd.z, list(range(cfg.members)), mlp_spec(cfg, embeddings.shape[1]),
                                 train_spec(cfg), seed, progress=False)
    log.info("reward heads: %d MLP members on %d rows, out-of-bag RMSE (std units) %s", cfg.members, len(rd.codes),
             " ".join(f"{m['oob_rmse_std_units']:.3f}" for m in metrics))
    return assemble(net, rd, cfg), rd, metrics

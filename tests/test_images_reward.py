"""The image reward: MLP members over embeddings, the bundled LAION head, the CLIP embedding path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braid_ray.config import load_config
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.reward.fit import assemble, mlp_spec, reward_data, score, train_spec
from braid_ray.reward.stacked import MLPSpec, StackedMLP
from braid_ray.reward.train import train_members


def _embeddings(n: int = 400, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with a label that is linear in them (plus noise), like aesthetic scores of CLIP embeddings."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = rng.normal(size=dim)
    return x, x @ w + rng.normal(0, 0.05, n)


def test_mlp_members_fit_vectors_and_round_trip_through_a_checkpoint() -> None:
    x, y = _embeddings()
    cfg = load_config(None, ["reward.members=3", "reward.hidden=16", "reward.layers=2", "reward.epochs=20",
                             "reward.batch_size=64", "reward.lr=1e-2"])
    rd = reward_data(x, y, 0.1, seed=0)
    net, metrics = train_members(rd.codes, rd.z, [0, 1, 2], mlp_spec(cfg.reward, x.shape[1]), train_spec(cfg.reward),
                                 seed=0, progress=False)
    assert isinstance(net, StackedMLP) and [m["member"] for m in metrics] == [0, 1, 2]
    reward = assemble(net, rd, cfg.reward)
    r, g = score(reward, x[rd.holdout], "none")  # float vectors are member inputs, not sequence codes
    assert np.corrcoef(r, y[rd.holdout])[0, 1] > 0.8 and np.all(g == 0)
    again = ConservativeReward.from_bytes(reward.to_bytes(), penalty="bonus")
    assert isinstance(again.net, StackedMLP)
    xt = torch.from_numpy(x[:8])
    for penalty in ("min", "lcb", "bonus"):
        torch.testing.assert_close(again(xt, penalty), reward(xt, penalty))


def test_mlp_member_weights_do_not_depend_on_grouping() -> None:
    spec = MLPSpec(dim=8, hidden=6, layers=2, spectral_norm=True)
    together = StackedMLP(spec, [0, 1, 2], seed=4)
    alone = StackedMLP(spec, [2], seed=4)
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(together.state_dict()[key][2], value[0])
    with pytest.raises(ValueError, match=r"expected \(M=3, B, 8\) or \(B, 8\)"):
        together.features(torch.zeros(2, 5))

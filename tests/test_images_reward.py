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


GOLDEN_V2 = [1.6555, 2.3593, 3.0698, 3.6725, 4.2380, 4.7010, 5.0731, 5.3654, 5.5767, 5.7468]
GOLDEN_V1 = [-2.4579, -0.1379, 1.8951, 3.5849, 5.0997, 6.4701, 7.7870, 9.0480, 10.2264, 11.3044]


@pytest.mark.parametrize("name, golden", [("laion_v2", GOLDEN_V2), ("laion_v1", GOLDEN_V1)])
def test_laion_heads_reproduce_their_golden_scores(name: str, golden: list[float]) -> None:
    from braid_ray.images.aesthetic import laion_head, reference_embeddings

    emb = torch.nn.functional.normalize(torch.from_numpy(reference_embeddings()), dim=-1)
    scores = laion_head(name)(emb)
    assert scores.shape == (10,)
    np.testing.assert_allclose(scores.numpy(), golden, atol=1e-4)
    assert not any(p.requires_grad for p in laion_head(name).parameters())


def test_clip_embedding_is_unit_norm_and_differentiable_in_the_pixels() -> None:
    from braid_ray.images.aesthetic import ClipEmbedder, from_uint8, load_image_encoder, to_uint8

    embedder = ClipEmbedder(load_image_encoder("tiny"))
    images = (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_(True)  # resized to the encoder's 16 px
    emb = embedder(images)
    assert emb.shape == (3, 768)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    emb[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    back = from_uint8(to_uint8(images))
    assert (back - images.detach()).abs().max() <= 1 / 127.5 + 1e-6

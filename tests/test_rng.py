"""Seeded constructors: weights depend on their seed alone, and building them leaves torch's global RNG as it was."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from braid_ray.config import OracleConfig
from braid_ray.images.aesthetic import TINY, load_image_encoder
from braid_ray.images.components import tiny_components, tiny_unet
from braid_ray.images.finetune import add_lora
from braid_ray.oracles.trained import TrainedCNNOracle
from braid_ray.seeding import seeded


def _weights(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def _tiny_oracle(seed: int) -> nn.Module:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(64, 8))
    y = (codes == 2).sum(1).astype(np.float64)
    cfg = OracleConfig(channels=4, layers=1, kernel_size=3, hidden=8, dropout=0.2, epochs=2, batch_size=16)
    return TrainedCNNOracle.fit(codes, y, cfg, seed).model  # dropout draws too, while training


def _tiny_components(seed: int) -> list[nn.Module]:
    c = tiny_components()  # its seeds are fixed: the tiny "pretrained" model never depends on run.seed
    return [c.unet, c.vae, c.text_encoder]


BUILDERS: dict[str, Callable[[int], list[nn.Module]]] = {
    "tiny_components": _tiny_components,
    "tiny_image_encoder": lambda seed: [load_image_encoder(TINY)],
    "add_lora": lambda seed: [add_lora(tiny_unet(), rank=2, seed=seed)],
    "trained_oracle": lambda seed: [_tiny_oracle(seed)],
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_weights_depend_on_the_seed_alone_and_the_global_rng_is_untouched(name: str) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _weights(BUILDERS[name](7))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is where it was
    torch.rand(1000)  # a different global state must not change the weights
    second = _weights(BUILDERS[name](7))
    assert len(first) == len(second) > 0 and all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_lora_seed_matters() -> None:
    a, b = (_weights([add_lora(tiny_unet(), rank=2, seed=s)]) for s in (0, 1))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_seeded_restores_the_state_even_when_the_block_raises() -> None:
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError), seeded(5):
        torch.rand(3)
        raise RuntimeError
    assert torch.equal(torch.get_rng_state(), state)
    with seeded(5):
        drawn = torch.rand(3)
    with seeded(5):
        assert torch.equal(torch.rand(3), drawn)

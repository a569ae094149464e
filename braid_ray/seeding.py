"""Seeded construction of weights without touching the caller's random state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to ``seed``, then restore the caller's state.

    Weights built inside depend on ``seed`` alone, and code after the block draws exactly what it would have
    drawn without it. Only the CPU generator is forked and seeded (CUDA's is left alone, so the block neither
    initialises CUDA nor reseeds it): build weights on the CPU inside the block and move them afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield

"""Choosing the torch device of an in-process run (Ray Train workers take ``ray.train.torch.get_device()``)."""

from __future__ import annotations

import torch


def resolve_device(setting: str) -> torch.device:
    """``run.device``: ``auto`` = the first CUDA device when one is visible, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda, but torch sees no CUDA device (a CPU-only torch build, or no GPU); "
                         "use run.device=auto or cpu")
    return torch.device(setting)

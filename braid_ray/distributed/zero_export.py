"""Consolidating a ZeRO checkpoint (shards of all ranks, merged into one Ray checkpoint) into fp32 weights."""

from __future__ import annotations

from pathlib import Path

import torch


def consolidated_fp32(checkpoint_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The trainable module's fp32 state dict from a ZeRO-2 or ZeRO-3 checkpoint directory (``tag`` = the
    ``latest`` file's when None). Exact: the fp32 master partitions are concatenated, not re-cast."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)

"""Exporting fine-tuned weights: consolidated fp32 safetensors, and LoRA weights stock diffusers loads.

A ZeRO checkpoint is consolidated into one fp32 state dict of the trainable parameters by
``braid_ray.distributed.zero_export`` (DeepSpeed's own tool); this module turns such a dict into files.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import save_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # pass as weight_name= to load_lora_weights
_ADAPTER = re.compile(r"\.(lora_[AB])\.default\.")


def unet_weights(state: dict[str, torch.Tensor], prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The UNet's entries of a state dict of the policy (the module DeepSpeed wraps), without the prefix."""
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no UNet weights (keys starting with {prefix!r}) in the state dict")
    return out


def lora_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA entries of a peft-wrapped UNet's state dict, named as ``peft.get_peft_model_state_dict`` names
    them (adapter name ``default`` dropped)."""
    out = {_ADAPTER.sub(r".\1.", k): v for k, v in state.items() if _ADAPTER.search(k)}
    if not out:
        raise ValueError("no LoRA weights (keys with .lora_A.default. / .lora_B.default.) in the state dict")
    return out


def save_fp32(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(path))
    return path


def save_lora_for_diffusers(state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` from a UNet state dict holding LoRA weights;
    ``StableDiffusionPipeline.load_lora_weights(directory, weight_name=LORA_WEIGHT_NAME)`` loads it."""
    layers = convert_state_dict_to_diffusers({k: v.detach().float().contiguous().cpu()
                                              for k, v in lora_only(state).items()})
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME,
                                              safe_serialization=True)
    return Path(directory) / LORA_WEIGHT_NAME

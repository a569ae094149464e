"""The image sections of the one config: presets, validation, and the DeepSpeed config derived from them."""

from __future__ import annotations

import pytest

from braid_ray.config import ConfigError, load_config
from braid_ray.images.zero import deepspeed_config
from tests.conftest import ROOT


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_batch_arithmetic_holds_for_any_world_size(world: int, stage: int) -> None:
    cfg = load_config(ROOT / "configs" / "sd15_aesthetic_braid.yaml", [f"deepspeed.zero_stage={stage}"])
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["train_batch_size"] == cfg.finetune.batch_size * cfg.finetune.grad_accum  # the config's global batch
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] and "optimizer" not in ds
    assert ds["gradient_clipping"] == cfg.finetune.clip and ds["zero_allow_untested_optimizer"]


@pytest.mark.parametrize("lora_rank, stage, use_gpu, expected_stage, overlap", [
    (4, "auto", False, 1, False),  # LoRA: only the optimizer state is worth sharding
    (0, "auto", False, 2, False),  # a full UNet: gradients too
    (0, "auto", True, 2, True),  # overlap the reduction with backward on GPUs
    (4, "auto", True, 1, False),
    (4, 3, True, 3, True),  # an explicit stage is honoured
    (0, 2, False, 2, False),
])
def test_zero_stage_follows_what_is_trained(lora_rank: int, stage, use_gpu: bool, expected_stage: int,
                                            overlap: bool) -> None:
    keys = [f"image.lora_rank={lora_rank}", f"ray.use_gpu={use_gpu}"]
    try:
        cfg = load_config(ROOT / "configs" / "sd_tiny_cpu.yaml", [*keys, f"deepspeed.zero_stage={stage}"])
    except ConfigError:  # a config.py whose zero_stage is a plain int: "auto" set past its type check
        cfg = load_config(ROOT / "configs" / "sd_tiny_cpu.yaml", keys)
        cfg.deepspeed.zero_stage = stage
    zero = deepspeed_config(cfg, 2)["zero_optimization"]
    assert zero["stage"] == expected_stage and zero["overlap_comm"] is overlap
    assert ("allgather_bucket_size" in zero) == (expected_stage < 3)


def test_real_preset_is_sd15_lora_zero2_bf16() -> None:
    cfg = load_config(ROOT / "configs" / "sd15_aesthetic_braid.yaml")
    assert cfg.domain == "image" and cfg.image.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.image.lora_rank > 0 and cfg.diffusion.steps == 50 and cfg.deepspeed.zero_stage == 2
    assert cfg.deepspeed.precision == "bf16" and cfg.image.guidance_scale > 1 and cfg.finetune.alpha > 0


def test_uneven_batch_split_names_the_key() -> None:
    cfg = load_config(ROOT / "configs" / "sd_tiny_cpu.yaml", ["finetune.batch_size=5"])
    with pytest.raises(ValueError, match="finetune.batch_size: got 5, expected a multiple of the 2 workers"):
        deepspeed_config(cfg, 2)


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: got 4, expected 'auto' (1 with LoRA, 2 for a full UNet)"),
    ("image.prompts=poems", "image.prompts: got 'poems', expected one of"),
    ("image.oracle=pickscore", "image.oracle: got 'pickscore', expected one of ['laion_v1', 'laion_v2']"),
    ("image.guidance_scale=0.5", "image.guidance_scale: got 0.5, expected a CFG weight >= 1"),
    ("finetune.methods=[ddom]", "finetune.methods: got 'ddom'"),
    ("domain=video", "domain: got 'video', expected 'sequence' | 'image'"),
])
def test_bad_image_keys_name_the_key_and_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sd_tiny_cpu.yaml", [override])
    assert message in str(err.value)

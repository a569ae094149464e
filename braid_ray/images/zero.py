"""The DeepSpeed config, derived from the one config and the Ray world size (no DeepSpeed import here).

DeepSpeed checks train_batch_size == micro_batch_per_gpu * gradient_accumulation_steps * world_size; deriving
all three from ``finetune.batch_size`` (global images per micro-batch, split over the workers as on the
sequence path), ``finetune.grad_accum`` and the world size makes the identity hold by construction.

The ZeRO stage follows from what is trained (``deepspeed.zero_stage: auto``): LoRA adapters are a few MB, so
sharding their optimizer state (stage 1) is all that pays; a full UNet shards its gradients too (stage 2).
Stage 3 (parameters sharded, gathered for every forward) only when the config asks for it.
"""

from __future__ import annotations

from typing import Any

from braid_ray.config import Config, ZeroStage

ZERO_STAGES: tuple[ZeroStage, ...] = (1, 2, 3)  # the stages deepspeed_config writes (config: deepspeed.zero_stage)


def micro_batch(cfg: Config, world_size: int) -> int:
    """Images per worker per micro-batch: the global ``finetune.batch_size`` split evenly over the workers."""
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size}, expected >= 1")
    if cfg.finetune.batch_size % world_size:
        raise ValueError(f"finetune.batch_size: got {cfg.finetune.batch_size}, expected a multiple of the "
                         f"{world_size} workers (DeepSpeed needs the same micro-batch on every worker)")
    return cfg.finetune.batch_size // world_size


def zero_stage(cfg: Config) -> int:
    """``deepspeed.zero_stage``, with ``auto`` resolved: 1 for LoRA (``image.lora_rank > 0``), 2 for a full UNet."""
    stage = cfg.deepspeed.zero_stage
    if stage == "auto":
        return 1 if cfg.image.lora_rank > 0 else 2
    assert stage in ZERO_STAGES, f"deepspeed.zero_stage={stage!r}: config validation admits {ZERO_STAGES} or auto"
    return int(stage)


def overlap_comm(cfg: Config, stage: int) -> bool:
    """Overlap the gradient reduction with backward: on GPUs from ZeRO-2 on (it needs CUDA streams; on the CPU
    it only adds copies), or wherever ``deepspeed.overlap_comm=true`` asks for it."""
    return cfg.deepspeed.overlap_comm is True or (cfg.ray.use_gpu and stage >= 2)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    ft, ds = cfg.finetune, cfg.deepspeed
    micro = micro_batch(cfg, world_size)
    stage = zero_stage(cfg)
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": overlap_comm(cfg, stage), "contiguous_gradients": True,
                            "reduce_bucket_size": ds.bucket_size}
    if stage < 3:
        zero["allgather_bucket_size"] = ds.bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = ds.bucket_size
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ft.grad_accum,
        "train_batch_size": micro * ft.grad_accum * world_size,
        "gradient_clipping": ft.clip,  # 0 = off, as finetune.clip
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # A torch optimizer (the FineTuner's Adam) is not on DeepSpeed's tested list; it works with ZeRO 1, 2 and 3.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,  # progress goes through our own logging
        "wall_clock_breakdown": False,
    }
    if ds.optimizer == "deepspeed":
        conf["optimizer"] = {"type": "Adam", "params": {"lr": ft.lr, "torch_adam": False}}
    return conf

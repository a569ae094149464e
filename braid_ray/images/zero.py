"""The DeepSpeed config, derived from the one config and the Ray world size (no DeepSpeed import here).

DeepSpeed checks train_batch_size == micro_batch_per_gpu * gradient_accumulation_steps * world_size; deriving
all three from ``finetune.batch_size`` (per worker), ``finetune.grad_accum`` and the world size makes the
identity hold by construction for any number of workers.
"""

from __future__ import annotations

from typing import Any

from braid_ray.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size}, expected >= 1")
    ft, ds = cfg.finetune, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm, "contiguous_gradients": True,
                            "reduce_bucket_size": ds.bucket_size}
    if ds.zero_stage == 2:
        zero["allgather_bucket_size"] = ds.bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = ds.bucket_size
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ft.batch_size,
        "gradient_accumulation_steps": ft.grad_accum,
        "train_batch_size": ft.batch_size * ft.grad_accum * world_size,
        "gradient_clipping": ft.clip,  # 0 = off, as finetune.clip
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # A torch optimizer (the FineTuner's Adam) is not on DeepSpeed's tested list; it works with ZeRO 2 and 3.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,  # progress goes through our own logging
        "wall_clock_breakdown": False,
    }
    if ds.optimizer == "deepspeed":
        conf["optimizer"] = {"type": "Adam", "params": {"lr": ft.lr, "torch_adam": False}}
    return conf

"""Images: BRAID for Stable Diffusion with a conservative aesthetic reward (issue 6).

Core modules (no Ray, no DeepSpeed): ``components`` (SD from a hub id / local path, or tiny from configs),
``prompts`` (named prompt sets), ``sampler`` (grad-enabled DDIM with CFG, truncated backprop and the
per-step KL), ``aesthetic`` (CLIP embedding, LAION heads, the conservative reward on embeddings),
``zero`` (the DeepSpeed config from the one config and the world size), ``export`` (LoRA weights for
stock diffusers), ``finetune`` (the fine-tuner on top of the sequence path's loop), ``stages`` (offline
data, reward, fine-tuning and evaluation stages) and ``evaluate`` (grids, score distributions, curves).
``images.dist`` holds the Ray / DeepSpeed adapters, like ``braid_ray.dist`` for sequences.
"""

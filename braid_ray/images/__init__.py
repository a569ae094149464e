"""Images: BRAID for Stable Diffusion with a conservative aesthetic reward (issue 6).

Core modules (no Ray, no DeepSpeed):
  components  SD components from a hub id / local folder, or tiny from configs; a stock diffusers pipeline
  prompts     named prompt sets
  sampler     grad-enabled DDIM with CFG, truncated backprop and the per-step KL; LoRA-disabled reference
  aesthetic   CLIP image embedding, the bundled LAION heads (oracle), the image reward module
  heads       the sequence path's conservative reward with MLP members, fitted on (embedding, score) rows
  finetune    the sequence path's FineTuner with the image rollout and reward (and a DeepSpeed engine step)
  zero        the DeepSpeed config derived from the one config and the world size (ZeRO stage from what is trained)
  export      consolidated fp32 weights and LoRA weights for stock diffusers
  offline     offline images: sampling and CLIP embedding as batch callables
  evaluate    sample grids, score tables, r_hat-vs-oracle curves
  stages      the image pipeline: offline data, reward heads, fine-tuning, evaluation
  settings    DEFAULT_QUANTILE (the image sections are validated in braid_ray.config)
Their Ray / DeepSpeed adapters live with the sequence ones in ``braid_ray.distributed``: ``images`` (ZeRO
training on Ray Train), ``zero_export`` (ZeRO consolidation), ``image_data`` (offline images by Ray Data, evaluation
as Ray tasks).
"""

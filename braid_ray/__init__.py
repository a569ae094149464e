"""braid-ray: conservative offline reward-guided fine-tuning of diffusion models (BRAID, Uehara et al.).

The core library never imports Ray or DeepSpeed; only ``braid_ray.distributed`` does.
"""

__version__ = "0.1.0"

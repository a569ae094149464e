"""Validation of the ``image:`` and ``deepspeed:`` config sections (called from ``braid_ray.config.validate``).

Light on imports: the registries it checks names against (prompt sets, oracle heads) load only for
``domain: image``, so sequence configs never pay for diffusers or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from braid_ray.config import ConfigError
from braid_ray.methods import METHODS
from braid_ray.images.zero import ZERO_STAGES

if TYPE_CHECKING:
    from braid_ray.config import Config

DEFAULT_QUANTILE = 0.5  # D_off = offline images below the median oracle score, unless data.quantile says otherwise


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def validate_image_sections(cfg: Config) -> None:
    ds = cfg.deepspeed
    _check(ds.zero_stage == "auto" or ds.zero_stage in ZERO_STAGES, "deepspeed.zero_stage", ds.zero_stage,
           "'auto' (1 with LoRA, 2 for a full UNet), 1, 2 or 3")
    _check(ds.bucket_size >= 1, "deepspeed.bucket_size", ds.bucket_size, "a positive number of elements")
    _check(ds.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
           ds.param_persistence_threshold, "a non-negative number of elements")
    im = cfg.image
    for key in ("resolution", "offline_images", "embed_batch_size", "embed_actors", "grid_images"):
        _check(getattr(im, key) >= 1, f"image.{key}", getattr(im, key), "an integer >= 1")
    _check(im.lora_rank >= 0, "image.lora_rank", im.lora_rank, "an integer >= 0 (0 = full fine-tuning)")
    _check(im.guidance_scale >= 1.0, "image.guidance_scale", im.guidance_scale, "a CFG weight >= 1 (1 = off)")
    _check(im.label_noise >= 0, "image.label_noise", im.label_noise, "a non-negative std")
    if cfg.domain != "image":
        return
    from braid_ray.images.aesthetic import LAION_HEADS
    from braid_ray.images.prompts import PROMPT_SETS

    _check(im.prompts in PROMPT_SETS, "image.prompts", im.prompts, f"one of {sorted(PROMPT_SETS)}")
    _check(im.oracle in LAION_HEADS, "image.oracle", im.oracle, f"one of {sorted(LAION_HEADS)}")
    for m in cfg.finetune.methods:
        image_methods = [n for n, meth in METHODS.items() if "image" in meth.domains]
        _check(m in image_methods, "finetune.methods", m, f"names from {image_methods}")
    _check(cfg.eval.n_samples >= 2, "eval.n_samples", cfg.eval.n_samples, "an integer >= 2")
    _check(im.offline_images >= 10 or im.offline_table is not None, "image.offline_images", im.offline_images,
           "at least 10 images (D_off and the reward's held-out rows are cut from them)")

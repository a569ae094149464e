"""Offline images: sampling them from the pretrained model, and embedding them with CLIP, batch by batch.

``SampleBatch`` and ``EmbedBatch`` are callables over column batches (dicts of numpy arrays), the shape
Ray Data's ``map_batches`` hands to an actor pool (``braid_ray.distributed.image_data``); without Ray the same
callables run in-process. Each loads its model once, in ``__init__``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from braid_ray.config import Config, from_dict
from braid_ray.images.aesthetic import ClipEmbedder, from_uint8, laion_head, load_image_encoder, to_uint8
from braid_ray.images.components import DTYPES, load_components
from braid_ray.images.prompts import prompt_set
from braid_ray.images.sampler import DDIMSchedule, ImagePolicy, SDBackbone, image_rollout


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, side: int | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> (H, W, 3) uint8, resized to side x side if given."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if side is not None and img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    return np.asarray(img)


def pretrained_policy(cfg: Config, device: torch.device) -> ImagePolicy:
    """The pretrained SD as a sampling policy (its own reference: sampling only, no KL)."""
    im = cfg.image
    comps = load_components(im.model, im.revision).to(device, DTYPES[im.frozen_dtype])
    comps.unet.requires_grad_(False).eval()
    backbone = SDBackbone(comps, DDIMSchedule(comps.scheduler, cfg.diffusion.steps, cfg.diffusion.eta), im.resolution)
    return ImagePolicy(backbone, comps.unet, im.guidance_scale, reference=comps.unet)


def offline_requests(cfg: Config) -> dict[str, np.ndarray]:
    """The rows of the offline image set: an id, the prompt (cycling through the prompt set) and a seed."""
    n, prompts = cfg.image.offline_images, prompt_set(cfg.image.prompts)
    ids = np.arange(n)
    return {"id": ids, "prompt": np.array([prompts[i % len(prompts)] for i in ids]),
            "seed": (cfg.run.seed * 1_000_003 + ids).astype(np.int64)}


class SampleBatch:
    """(id, prompt, seed) rows -> the same rows with PNG images sampled from the pretrained model.

    A batch shares one generator, seeded by its first row's seed; the batches a run forms are fixed by its
    row order and batch size.
    """

    def __init__(self, cfg: dict, device: str = "cpu"):
        self.cfg = from_dict(cfg)
        self.policy = pretrained_policy(self.cfg, torch.device(device))

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        g = torch.Generator().manual_seed(int(batch["seed"][0]))  # a CPU generator: the same noise on any device
        roll = image_rollout(self.policy, [str(p) for p in batch["prompt"]], 1, g, use_checkpoint=False, with_kl=False)
        pixels = to_uint8(self.policy.decode(roll.x0))
        return {**batch, "image": np.array([encode_png(p) for p in pixels], dtype=object)}


class EmbedBatch:
    """Rows with encoded images -> the same rows plus the unit-norm CLIP embedding and the oracle head's score."""

    def __init__(self, cfg: dict, device: str = "cpu", image_column: str = "image"):
        c = from_dict(cfg)
        self.embedder = ClipEmbedder(load_image_encoder(c.image.clip_model)).to(torch.device(device))
        self.oracle = laion_head(c.image.oracle).to(torch.device(device))
        self.column, self.device = image_column, torch.device(device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = np.stack([decode_image(b, self.embedder.size) for b in batch[self.column]])
        emb = self.embedder(from_uint8(pixels).to(self.device))
        return {**batch, "embedding": emb.cpu().numpy().astype(np.float32),
                "oracle": self.oracle(emb).cpu().numpy().astype(np.float64)}


def run_in_process(fn, rows: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Apply a batch callable over ``rows`` in this process (the ``ray.num_workers=0`` path)."""
    n = len(next(iter(rows.values())))
    outs = [fn({k: v[i:i + batch_size] for k, v in rows.items()}) for i in range(0, n, batch_size)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

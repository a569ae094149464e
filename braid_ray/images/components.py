"""Stable Diffusion components: UNet, VAE, CLIP text encoder + tokenizer, DDIM scheduler.

``load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")`` (or a local folder in diffusers layout)
loads them with ``from_pretrained``; ``load_components("tiny")`` builds the same classes from small configs
with fixed seeds, so every process (Ray workers, the evaluation, a test) gets the same "pretrained" tiny
model without downloading anything. The tiny model is random: it exercises every code path, not quality.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from braid_ray.seeding import seeded

TINY = "tiny"
TINY_SEED = 0  # the tiny "pretrained" weights never depend on run.seed
TINY_TEXT_LENGTH = 16  # tokens per prompt of the tiny tokenizer / text encoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD v1.5, 2 for the tiny VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def freeze(self) -> SDComponents:
        """VAE and text encoder are never trained: frozen, eval mode (the UNet is the caller's business)."""
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        return self

    def to(self, device: torch.device, frozen_dtype: torch.dtype = torch.float32) -> SDComponents:
        """Move everything to ``device``; the frozen VAE and text encoder also to ``frozen_dtype``."""
        self.unet.to(device)
        for module in (self.vae, self.text_encoder):
            module.to(device) if frozen_dtype == torch.float32 else module.to(device, frozen_dtype)
        return self


def tiny_tokenizer(max_length: int = TINY_TEXT_LENGTH) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer built from an in-code vocab (no merges, no files, no download).

    transformers 5 ignores ``vocab_file=``/``merges_file=`` paths given to the constructor (DESIGN.md,
    Pitfalls), so the vocab and merges are passed as objects.
    """
    symbols = string.ascii_lowercase + string.digits + "!,.'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # "</w>" marks a word's last symbol, as in CLIP's BPE
        for c in symbols:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length)


def tiny_unet() -> UNet2DConditionModel:
    with seeded(TINY_SEED):
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
            attention_head_dim=4)


def tiny_components() -> SDComponents:
    """The SD v1.5 component classes at toy size: 16x16 images, 8x8x4 latents, 16-token prompts."""
    unet = tiny_unet()
    with seeded(TINY_SEED + 1):
        vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=16)
    tokenizer = tiny_tokenizer()
    with seeded(TINY_SEED + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_hidden_layers=1, max_position_embeddings=TINY_TEXT_LENGTH, projection_dim=16, bos_token_id=0,
            eos_token_id=1, pad_token_id=1))
    return SDComponents(unet, vae, text_encoder, tokenizer, sd_scheduler())


def sd_scheduler(config: dict | None = None) -> DDIMScheduler:
    """SD v1.5's DDIM scheduler (scaled-linear betas, no final alpha = 1, so the last step keeps a variance)."""
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return DDIMScheduler(**(base | (config or {})))


def load_components(model: str, revision: str | None = None) -> SDComponents:
    """SD components from a hub id or a local diffusers folder (``from_pretrained``), or ``"tiny"``."""
    if model == TINY:
        return tiny_components().freeze()
    kw = {"revision": revision} if revision else {}
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
    scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler).freeze()


def stock_pipeline(c: SDComponents, unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    """A stock diffusers pipeline over these components (no safety checker), e.g. to load exported LoRA weights."""
    return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                   unet=unet if unet is not None else c.unet, scheduler=c.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

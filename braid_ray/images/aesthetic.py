"""The aesthetic reward on images: image -> L2-normalised CLIP image embedding -> reward heads.

Heads are (a) the LAION aesthetic predictors, bundled as npz (``braid_ray/assets/aesthetic_laion``), used
as the evaluation oracle, and (b) the conservative reward r_hat - g_hat of the sequence path
(``braid_ray.reward``) with MLP members, trained on an offline table of (embedding, score).
Everything is differentiable in the image, so the fine-tuner backpropagates through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from braid_ray.reward.conservative import ConservativeReward
from braid_ray.seeding import seeded

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "aesthetic_laion"
TINY = "tiny"
TINY_SEED = 3
EMBED_DIM = 768  # CLIP ViT-L/14 image embedding, the LAION heads' input

# OpenAI CLIP's pixel normalisation (CLIPImageProcessor's image_mean / image_std)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# LAION heads (the oracle)

# name -> (file, Linear layer indices of the upstream nn.Sequential)
LAION_HEADS = {
    "laion_v2": ("sac+logos+ava1-l14-linearMSE.npz", (0, 2, 4, 6, 7)),  # improved aesthetic predictor
    "laion_v1": ("sa_0_4_vit_l_14_linear.npz", None),  # LAION-Aesthetics V1, one Linear(768, 1)
}


def laion_head(name: str = "laion_v2") -> nn.Sequential:
    """The LAION aesthetic head ``name`` as a frozen module: embedding (B, 768) -> score (B,) (AVA 1-10 scale).

    The v2 MLP has no nonlinearities between its Linear layers (upstream's ReLUs are commented out);
    its Dropouts are identity at inference and are left out.
    """
    if name not in LAION_HEADS:
        raise ValueError(f"unknown oracle head {name!r}; valid: {sorted(LAION_HEADS)}")
    file, layers = LAION_HEADS[name]
    with np.load(ASSETS / file, allow_pickle=False) as w:
        if layers is None:
            linears = [(w["weight"], w["bias"])]
        else:
            linears = [(w[f"layers.{i}.weight"], w[f"layers.{i}.bias"]) for i in layers]
    modules = []
    for weight, bias in linears:
        lin = nn.Linear(weight.shape[1], weight.shape[0])
        lin.weight.data.copy_(torch.from_numpy(weight))
        lin.bias.data.copy_(torch.from_numpy(bias))
        modules.append(lin)
    head = nn.Sequential(*modules, nn.Flatten(0))
    return head.requires_grad_(False).eval()


def reference_embeddings() -> np.ndarray:
    """The 10 bundled real CLIP ViT-L/14 'aesthetic embeddings' for rating buckets 0..9, (10, 768) float32."""
    with np.load(ASSETS / "vit_l_14_reference_embeddings.npz", allow_pickle=False) as f:
        return np.concatenate([f[f"rating{i}"] for i in range(10)]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# CLIP image embedding


def load_image_encoder(name: str) -> CLIPVisionModelWithProjection:
    """CLIP's vision tower with projection from a hub id or folder (``from_pretrained``), or ``"tiny"``
    (built from a small config with a fixed seed, 768-d output like ViT-L/14 so the LAION heads apply)."""
    if name == TINY:
        with seeded(TINY_SEED):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(
                image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                num_hidden_layers=1, projection_dim=EMBED_DIM))
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(name)
    return model.requires_grad_(False).eval()


class ClipEmbedder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> unit-norm CLIP image embeddings (B, D), differentiable in the images.

    The preprocessing is CLIPImageProcessor's in torch ops (resize to the encoder's input side, normalise with
    CLIP's mean and std) so gradients reach the pixels; it resizes the whole image instead of
    resize-then-centre-crop, since generated images are square.
    """

    def __init__(self, encoder: CLIPVisionModelWithProjection):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.size = int(encoder.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(self.encoder.dtype)
        emb = self.encoder(pixel_values=x).image_embeds.float()
        return F.normalize(emb, dim=-1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, for PNGs and grids."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> images (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


class ImageReward(nn.Module):
    """Images -> (r_hat, g_hat) of the conservative reward on their CLIP embeddings, and the oracle's score.

    ``forward`` is the fine-tuning reward (differentiable); ``oracle`` is for monitoring and evaluation only.
    """

    def __init__(self, embedder: ClipEmbedder, reward: ConservativeReward, oracle: nn.Module):
        super().__init__()
        self.embedder, self.reward, self.oracle_head = embedder, reward, oracle

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reward(self.embedder(images))

    def with_penalty(self, penalty: str, strength: float | None = None) -> ImageReward:
        return ImageReward(self.embedder, self.reward.with_penalty(penalty, strength), self.oracle_head)

    @torch.no_grad()
    def oracle(self, images: torch.Tensor) -> torch.Tensor:
        return self.oracle_head(self.embedder(images))

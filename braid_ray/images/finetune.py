"""BRAID fine-tuning of Stable Diffusion: the sequence path's FineTuner with an image rollout and reward.

The objective, its terms, randomised K and the torch optimizer (Adam, created once) all come from
``braid_ray.finetune.FineTuner``; this module supplies the image rollout (``sample``) and, under DeepSpeed,
a ``train_step`` that lets the ZeRO engine own backward and the update (the engine wraps the FineTuner's Adam).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
from peft import LoraConfig
from torch import nn

from braid_ray.config import Config
from braid_ray.finetune.trainer import FineTuner, StepMetrics
from braid_ray.images.aesthetic import ClipEmbedder, ImageReward, laion_head, load_image_encoder
from braid_ray.images.components import DTYPES, load_components
from braid_ray.images.prompts import sample_prompts
from braid_ray.images.sampler import (DDIMSchedule, ImagePolicy, ImageRollout, SDBackbone, image_early_kl,
                                      image_rollout)
from braid_ray.images.zero import micro_batch
from braid_ray.methods import METHODS
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.seeding import seeded

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers' LoRA examples


def add_lora(unet: nn.Module, rank: int, seed: int) -> nn.Module:
    """Freeze ``unet`` and add LoRA adapters; B starts at zero, so the policy starts at the pretrained one."""
    unet.requires_grad_(False)
    with seeded(seed):  # the same A on every rank (peft builds the adapters on the CPU, then moves them)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    return unet


def active_steps(cfg: Config) -> int | None:
    """The steps the fine-tuned UNet acts on: the last finetune.k (``early_steps: auto | pretrained``; the earlier
    ones are the pretrained model's, KL exactly 0) or all of them (``kl``: the early steps pay their KL, at the
    cost of a reference and a differentiable UNet pass per step)."""
    return None if cfg.finetune.early_steps == "kl" else cfg.finetune.k


def build_policy(cfg: Config, device: torch.device) -> ImagePolicy:
    """The pretrained SD with LoRA adapters (``image.lora_rank > 0``) or a trainable UNet and its frozen copy."""
    im = cfg.image
    comps = load_components(im.model, im.revision).to(device, DTYPES[im.frozen_dtype])
    backbone = SDBackbone(comps, DDIMSchedule(comps.scheduler, cfg.diffusion.steps, cfg.diffusion.eta), im.resolution)
    if im.lora_rank > 0:
        # .to(device) again: the adapters are new parameters, made after the move
        return ImagePolicy(backbone, add_lora(comps.unet, im.lora_rank, cfg.run.seed).to(device), im.guidance_scale,
                           active_steps=active_steps(cfg))
    reference = copy.deepcopy(comps.unet).to(dtype=DTYPES[im.frozen_dtype])
    return ImagePolicy(backbone, comps.unet.requires_grad_(True), im.guidance_scale, reference,
                       active_steps=active_steps(cfg))


def load_image_reward(cfg: Config, reward_bytes: bytes, method: str, device: torch.device) -> ImageReward:
    """CLIP embedder + the conservative heads under ``method``'s penalty + the oracle head (monitoring only)."""
    embedder = ClipEmbedder(load_image_encoder(cfg.image.clip_model).to(device, DTYPES[cfg.image.frozen_dtype]))
    heads = ConservativeReward.from_bytes(reward_bytes, penalty=METHODS[method].penalty, strength=cfg.finetune.strength)
    return ImageReward(embedder, heads, laion_head(cfg.image.oracle)).to(device)


class ImageFineTuner(FineTuner):
    """FineTuner over images: x0 are SD latents, decoded by the VAE, embedded by CLIP, scored by the heads.

    Without an engine it trains with the FineTuner's own torch step (one process); ``attach(engine)`` hands
    backward and the update to a DeepSpeed engine built around the same policy (UNet) and Adam. ``seed`` is this
    worker's prompt and noise stream; K comes from ``run.seed`` alone, so every worker unrolls the same number
    of steps (ZeRO-3 gathers parameters per step: a rank with another K would hang the others). ``all_finite``
    (data-parallel runs) tells from this rank's flag whether every rank's loss is finite: a collective, so that
    all ranks skip backward together. The oracle's mean score of each step's training images goes into
    ``StepMetrics.oracle`` (and ``last_oracle``): for the r_hat-vs-oracle curves, never in the loss.
    """

    def __init__(self, policy: ImagePolicy, reward: ImageReward, cfg: Config, seed: int,
                 device: torch.device | None = None, world_size: int = 1,
                 all_finite: Callable[[bool], bool] | None = None):
        ft = cfg.finetune
        self.image_reward, self.prompt_set, self.all_finite = reward, cfg.image.prompts, all_finite
        self._oracle: list[torch.Tensor] = []
        self.last_oracle = math.nan
        self.engine = None
        super().__init__(policy, self._reward, alpha=ft.alpha, k=ft.k, batch_size=micro_batch(cfg, world_size),
                         lr=ft.lr, steps=ft.steps, clip=ft.clip, grad_accum=ft.grad_accum,
                         randomize_k=ft.randomize_k, reward_scale=reward.reward.stats.y_std, seed=seed,
                         k_seed=cfg.run.seed, device=device or policy.device)

    def _reward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.image_reward.embedder(self.policy.decode(x0))
        with torch.no_grad():
            self._oracle.append(self.image_reward.oracle_head(emb.detach()))
        return self.image_reward.reward(emb)

    def sample(self, n: int, k: int) -> ImageRollout:
        prompts = sample_prompts(self.prompt_set, n, self.generator)
        return image_rollout(self.policy, prompts, k, self.generator, self.use_checkpoint)

    def loss(self, roll: ImageRollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The FineTuner's loss plus alpha * KL of the early steps where the UNet acts, in the same graph (one
        backward, as DeepSpeed's engine wants); each early UNet pass is checkpointed."""
        loss, terms = super().loss(roll)
        if self.alpha > 0 and roll.early:
            loss = loss + self.alpha * image_early_kl(self.policy, roll, self.use_checkpoint).mean()
        return loss, terms

    def pay_early_kl(self, roll: ImageRollout, weight: float) -> None:
        """Already in ``loss``."""

    def attach(self, engine) -> None:
        """Train through a DeepSpeed engine whose module is ``policy`` (and whose optimizer wraps ours)."""
        self.engine = engine

    def train_step(self) -> StepMetrics:
        self._oracle = []
        metrics = super().train_step() if self.engine is None else self._engine_step()
        self.last_oracle = float(torch.cat(self._oracle).mean()) if self._oracle else math.nan
        metrics.oracle = self.last_oracle
        return metrics

    def _engine_step(self) -> StepMetrics:
        """One optimizer step through DeepSpeed: backward per micro-batch (the engine reduces and partitions
        the gradients), ``engine.step()`` after each (it updates at the accumulation boundary only).

        A non-finite loss raises FloatingPointError before backward, on every rank at once (``all_finite``):
        backward starts the gradient reduction, which a rank that stopped would never join."""
        self.policy.trainable.train()
        k = self._k()
        totals: dict[str, float] = {}
        for _ in range(self.grad_accum):
            loss, terms = self.loss(self.sample(self.batch_size, k))
            finite = all(math.isfinite(v) for v in (loss.item(), *terms.values()))
            if not (self.all_finite(finite) if self.all_finite is not None else finite):
                what = f"non-finite loss ({terms})" if not finite else "non-finite loss on another worker"
                raise FloatingPointError(f"fine-tuning step {self.step + 1}: {what}; the last good checkpoint is kept")
            for key, v in terms.items():
                totals[key] = totals.get(key, 0.0) + v / self.grad_accum
            self.engine.backward(loss / self.grad_accum, scale_wrt_gas=False)  # already divided by grad_accum
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        # The norm is global (the same on every rank), so every rank stops here alike; fp16 skips an overflowing
        # step itself (loss scaling). Raised before the step's checkpoint could save the broken weights.
        if norm is not None and not math.isfinite(float(norm)) and not self.engine.fp16_enabled():
            raise FloatingPointError(f"fine-tuning step {self.step + 1}: non-finite gradient (norm {float(norm)}); "
                                     "the last good checkpoint is kept")
        self.step += 1
        return StepMetrics(step=self.step, grad_norm=float(norm) if norm is not None else math.nan, k=k, **totals)

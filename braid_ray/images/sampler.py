"""A grad-enabled DDIM sampler for Stable Diffusion with classifier-free guidance and the per-step KL.

diffusers' pipeline ``__call__`` runs under ``torch.no_grad``, so BRAID's objective needs its own loop.
Per DDIM step i (timestep t, previous timestep t'), with alpha_bar the cumulative alphas:
  x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)            (pred_original_sample)
  sigma_t = eta * sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_t'))
  mu      = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - sigma_t^2) eps     (prev_sample minus noise)
  x_t'    = mu + sigma_t z
eps is the CFG combination eps_u + w (eps_c - eps_u). Every step is Gaussian with the same sigma_t for the
fine-tuned and the pretrained model, so KL_t = ||mu_theta - mu_pre||^2 / (2 sigma_t^2) at the visited x_t;
with eta = 1 this is DDPM's ancestral step. SD's scheduler keeps alpha_bar of the final step below 1
(``set_alpha_to_one=False``), so even the last step has sigma > 0 and a finite KL.

Steps 1..T-K run without a graph; each of the last K runs under activation checkpointing of the whole
step (both UNet passes), so memory grows with K, not T. The step is the unit of checkpointing, not
diffusers' per-block ``enable_gradient_checkpointing``: with LoRA the reference pass runs with the adapters
disabled, and a per-block recomputation during backward would run with them enabled again.

A step is the policy module's ``forward``, and the policy is the module DeepSpeed wraps: under ZeRO-3 the
recomputation of a step then runs inside that module's backward, where DeepSpeed keeps the frozen weights
gathered until the step's backward is done. A checkpoint around UNet calls made outside any ZeRO module
would recompute with the frozen weights already re-partitioned (empty) and fail torch's metadata check.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from braid_ray.diffusion.sampler import Rollout
from braid_ray.images.components import SDComponents


class DDIMSchedule:
    """The DDIM step coefficients of ``scheduler`` at ``steps`` inference steps and a given eta."""

    def __init__(self, scheduler: DDIMScheduler, steps: int, eta: float):
        if steps < 1 or eta < 0:
            raise ValueError(f"DDIM: expected steps >= 1 and eta >= 0, got steps={steps}, eta={eta}")
        scheduler.set_timesteps(steps)
        self.timesteps = scheduler.timesteps.clone()  # descending, e.g. 981, 961, ..., 1 for T=50
        ratio = scheduler.config.num_train_timesteps // steps
        a = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        self.alpha = [float(a[t]) for t in self.timesteps]  # alpha_bar_t
        self.alpha_prev = [float(a[t - ratio]) if t - ratio >= 0 else final for t in self.timesteps]  # alpha_bar_t'
        self.sigma = [eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
                      for at, ap in zip(self.alpha, self.alpha_prev)]
        self.eta = eta

    def __len__(self) -> int:
        return len(self.timesteps)

    def mean(self, i: int, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """mu of step i (0 = the noisiest) from x_t and the (guided) noise prediction eps."""
        at, ap, s = self.alpha[i], self.alpha_prev[i], self.sigma[i]
        x0_hat = (x_t - math.sqrt(1 - at) * eps) / math.sqrt(at)
        return math.sqrt(ap) * x0_hat + math.sqrt(max(1 - ap - s**2, 0.0)) * eps


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[None]:
    """The pretrained UNet: the same module with its LoRA adapters switched off (no second copy held).

    Nestable: on exit the adapters are back in the state they had on entry.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    were_enabled = not any(m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer))
    unet.disable_adapters()
    try:
        yield
    finally:
        if were_enabled:
            unet.enable_adapters()


def has_adapters(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


@dataclass
class SDBackbone:
    """The frozen parts of the sampler: SD components, the DDIM schedule and the image side (pixels).

    It plays the role of the sequence path's diffusion backbone for the FineTuner (``backbone.schedule.eta``).
    """

    components: SDComponents
    schedule: DDIMSchedule
    resolution: int

    def __post_init__(self) -> None:
        if self.resolution % self.components.vae_factor:
            raise ValueError(f"image.resolution: got {self.resolution}, expected a multiple of the VAE factor "
                             f"{self.components.vae_factor}")


class ImagePolicy(nn.Module):
    """mu_theta and mu_pre at the same x_t for a text-conditioned UNet with classifier-free guidance.

    ``unet`` is trained: with LoRA adapters (then the reference is the same UNet with adapters disabled)
    or in full (then ``reference`` must be a frozen copy of the pretrained UNet). ``active_steps``: None = the
    fine-tuned UNet acts on every step; K = only on the last K steps, the earlier ones being the pretrained
    model's (so their KL is exactly zero, at training and at sampling alike).
    """

    def __init__(self, backbone: SDBackbone, unet: nn.Module, guidance_scale: float,
                 reference: nn.Module | None = None, active_steps: int | None = None):
        super().__init__()
        self.active_steps = active_steps
        if reference is None and not has_adapters(unet):
            raise ValueError("ImagePolicy: a UNet without LoRA adapters needs a frozen reference copy")
        self.backbone, self.unet, self.guidance_scale = backbone, unet, guidance_scale
        self.components, self.schedule = backbone.components, backbone.schedule
        if reference is not None:
            reference.requires_grad_(False).eval()
        # Outside the module tree: a frozen plain module, never sharded by ZeRO or saved with the trainable one.
        object.__setattr__(self, "reference", reference)
        side = backbone.resolution // self.components.vae_factor
        self.latent_shape = (unet.config.in_channels, side, side)
        self._uncond: torch.Tensor | None = None

    @property
    def trainable(self) -> nn.Module:
        return self.unet

    @property
    def device(self) -> torch.device:
        return self.components.vae.device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """[uncond; cond] text embeddings (2B, L, D) for CFG; the empty-prompt embedding is computed once."""
        tok, enc = self.components.tokenizer, self.components.text_encoder

        def embed(texts: list[str]) -> torch.Tensor:
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            return enc(ids)[0]

        if self._uncond is None:
            self._uncond = embed([""])
        cond = embed(list(prompts))
        return torch.cat([self._uncond.expand(len(prompts), -1, -1), cond])

    def _eps(self, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Guided noise prediction eps_u + w (eps_c - eps_u), both halves in one batched UNet call."""
        dtype = next(p.dtype for p in unet.parameters())
        out = unet(torch.cat([x_t, x_t]).to(dtype), t, encoder_hidden_states=text.to(dtype)).sample.float()
        eps_u, eps_c = out.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def acts(self, i: int) -> bool:
        """Whether the fine-tuned UNet acts at step index i (0 = the first, noisiest step)."""
        return self.active_steps is None or i >= len(self.schedule) - self.active_steps

    def _pretrained_eps(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self._eps(self.reference, x_t, t, text)
        with adapters_disabled(self.unet):
            return self._eps(self.unet, x_t, t, text)

    def means(self, x_t: torch.Tensor, i: int, text: torch.Tensor, reference: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(mu_theta, mu_pre, sigma) of step i at x_t (B, C, h, w); gradients reach x_t through both means."""
        t = self.schedule.timesteps[i].to(x_t.device)
        if not self.acts(i):
            mean = self.schedule.mean(i, x_t, self._pretrained_eps(x_t, t, text))
            return mean, (mean if reference else None), self.schedule.sigma[i]
        mean = self.schedule.mean(i, x_t, self._eps(self.unet, x_t, t, text))
        mean_pre = None
        if reference:
            mean_pre = self.schedule.mean(i, x_t, self._pretrained_eps(x_t, t, text))
        return mean, mean_pre, self.schedule.sigma[i]

    def forward(self, x_t: torch.Tensor, noise: torch.Tensor | None, i: int, text: torch.Tensor, with_kl: bool = True,
                mean_pre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: x_{t'} = mu_theta + sigma_t z, and KL_t = ||mu_theta - mu_pre||^2 / (2 sigma_t^2) per sample.

        With ``mean_pre`` given (an early step's, computed on the way) only mu_theta is computed and
        (mu_theta, KL_t) returned. Every UNet pass goes through this module call, which under ZeRO-3 is what
        gathers the sharded parameters."""
        if mean_pre is not None:
            t = self.schedule.timesteps[i].to(x_t.device)
            mean = self.schedule.mean(i, x_t, self._eps(self.unet, x_t, t, text))
            return mean, ((mean - mean_pre) ** 2).sum(dim=(1, 2, 3)) / (2 * self.schedule.sigma[i] ** 2)
        mean, mean_pre, sigma = self.means(x_t, i, text, reference=with_kl)
        if mean_pre is None:
            kl = torch.zeros(x_t.shape[0], device=x_t.device)
        else:
            kl = ((mean - mean_pre) ** 2).sum(dim=(1, 2, 3)) / (2 * sigma**2)  # KL_t, equal-variance Gaussians
        return mean + sigma * noise, kl

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents x_0 -> images (B, 3, H, W) in [-1, 1] through the frozen VAE, differentiable in the latents
        (checkpointed when a graph is being built, so the decoder's activations are not kept)."""
        vae = self.components.vae

        def run(z: torch.Tensor) -> torch.Tensor:
            return vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.float().clamp(-1, 1)

        if torch.is_grad_enabled() and latents.requires_grad:
            return checkpoint(run, latents, use_reentrant=False)
        return run(latents)


@dataclass
class ImageEarlyStep:
    """A step before the last K where the fine-tuned UNet acts: where its KL is paid (x_t detached)."""

    i: int
    x_t: torch.Tensor
    mean_pre: torch.Tensor


@dataclass
class ImageRollout(Rollout):
    prompts: list[str] = field(default_factory=list)
    text: torch.Tensor | None = None  # the prompts' [uncond; cond] embeddings, for the early steps' KL


def image_rollout(policy: ImagePolicy, prompts: list[str], k: int, generator: torch.Generator,
                  use_checkpoint: bool = True, with_kl: bool = True) -> ImageRollout:
    """Sample latents x_0 for ``prompts``; backpropagate through the last k steps only.

    Steps before the last k where the fine-tuned UNet acts (``policy.active_steps``: all of them, or the last
    finetune.k when K is drawn per batch) keep their x_t and mu_pre, for ``image_early_kl``. ``with_kl=False``
    skips the reference passes (sampling for evaluation; the KL is then zero).
    """
    steps = len(policy.schedule)
    if not 1 <= k <= steps:
        raise ValueError(f"K must be in [1, {steps}], got {k}")
    n, device = len(prompts), policy.device
    text = policy.encode_prompts(prompts)
    x = torch.randn((n, *policy.latent_shape), generator=generator, device=generator.device).to(device)
    kl_early = torch.zeros(n, device=device)
    per_step, early = [], []
    with torch.no_grad():
        for i in range(steps - k):
            paid = with_kl and policy.acts(i)
            mean, mean_pre, sigma = policy.means(x, i, text, reference=paid)
            if paid:
                kl = ((mean - mean_pre) ** 2).sum(dim=(1, 2, 3)) / (2 * sigma**2)
                kl_early += kl
                per_step.append(kl.mean())
                early.append(ImageEarlyStep(i, x, mean_pre))
            else:
                per_step.append(torch.zeros((), device=device))
            x = mean + sigma * torch.randn(x.shape, generator=generator, device=generator.device).to(device)
    kl_total = torch.zeros(n, device=device)
    for i in range(steps - k, steps):
        # drawn outside the checkpointed step, so that its recomputation is exact
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(device)
        if use_checkpoint and torch.is_grad_enabled():
            x, kl = checkpoint(policy, x, noise, i, text, with_kl, use_reentrant=False)
        else:
            x, kl = policy(x, noise, i, text, with_kl)
        kl_total = kl_total + kl
        per_step.append(kl.detach().mean())
    return ImageRollout(x, kl_total, torch.stack(per_step), kl_early=kl_early,
                        early=early if torch.is_grad_enabled() else [], prompts=list(prompts), text=text)


def image_early_kl(policy: ImagePolicy, roll: ImageRollout, use_checkpoint: bool = True) -> torch.Tensor:
    """The summed KL (B,) of the rollout's early steps, with a graph to the UNet's trainable weights (not through
    the chain); each step's UNet pass is checkpointed, so only its inputs are kept until backward."""
    total = torch.zeros(roll.x0.shape[0], device=roll.x0.device)
    for s in roll.early:
        if use_checkpoint:
            _, kl = checkpoint(policy, s.x_t, None, s.i, roll.text, True, s.mean_pre, use_reentrant=False)
        else:
            _, kl = policy(s.x_t, None, s.i, roll.text, True, s.mean_pre)
        total = total + kl
    return total

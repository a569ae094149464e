"""The grad-enabled DDIM sampler on a tiny SD: diffusers' step, the per-step KL, truncation, in-process training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from braid_ray.config import Config, load_config
from braid_ray.images.aesthetic import ClipEmbedder, from_uint8, laion_head, load_image_encoder
from braid_ray.images.components import load_components
from braid_ray.images.finetune import ImageFineTuner, build_policy, load_image_reward
from braid_ray.images.heads import fit_reward_heads
from braid_ray.images.sampler import DDIMSchedule, adapters_disabled, image_rollout
from tests.conftest import ROOT

PROMPTS = ["a cat", "a red bird"]


def tiny_cfg(*extra: str) -> Config:
    return load_config(ROOT / "configs" / "sd_tiny_cpu.yaml", list(extra))


def _perturb_lora(unet: torch.nn.Module, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def tiny_reward_bytes(cfg: Config, n: int = 64) -> bytes:
    """Reward heads fitted on the LAION v2 scores of tiny-CLIP embeddings of random images."""
    embed = ClipEmbedder(load_image_encoder("tiny"))
    pixels = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        emb = embed(from_uint8(pixels))
        y = laion_head("laion_v2")(emb).numpy()
    reward, _, _ = fit_reward_heads(cfg.reward, emb.numpy(), y, seed=0)
    return reward.to_bytes()


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_ddim_step_matches_diffusers(eta: float) -> None:
    scheduler = load_components("tiny").scheduler
    schedule = DDIMSchedule(scheduler, 6, eta)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in range(6):
        ref = scheduler.step(eps, schedule.timesteps[i], x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(schedule.mean(i, x, eps) + schedule.sigma[i] * z, ref, atol=1e-5, rtol=1e-5)
    assert min(schedule.sigma) > 0  # SD's final alpha_bar < 1: even the last step has a finite KL


def test_kl_is_zero_with_adapters_disabled_and_matches_the_gaussian_kl() -> None:
    cfg = tiny_cfg("diffusion.steps=4")
    policy = build_policy(cfg, torch.device("cpu"))
    _perturb_lora(policy.unet)
    with adapters_disabled(policy.unet):  # theta = the pretrained UNet: every step's KL is exactly 0
        roll = image_rollout(policy, PROMPTS, 3, torch.Generator().manual_seed(0))
    assert roll.kl.abs().max().item() == 0.0 and roll.kl_per_step.shape == (4,)  # every step, t = T..1
    roll = image_rollout(policy, PROMPTS, 3, torch.Generator().manual_seed(0))
    assert (roll.kl > 0).all()
    text = policy.encode_prompts(PROMPTS)
    x_t = torch.randn(2, *policy.latent_shape)
    mean, mean_pre, sigma = policy.means(x_t, 2, text)
    ours = ((mean - mean_pre) ** 2).sum((1, 2, 3)) / (2 * sigma**2)
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mean, sigma),
                                               torch.distributions.Normal(mean_pre, sigma)).sum((1, 2, 3))
    torch.testing.assert_close(ours, closed, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for n, p in policy.unet.named_parameters() if "lora" not in n)


def test_gradients_flow_only_through_the_last_k_steps() -> None:
    cfg = tiny_cfg("diffusion.steps=6")
    policy = build_policy(cfg, torch.device("cpu"))
    _perturb_lora(policy.unet)
    lora_layer = next(m for m in policy.unet.modules() if isinstance(m, BaseTunerLayer))
    calls: list[tuple[int, bool, bool]] = []  # (timestep, adapters on, output has a graph)
    hook = policy.unet.register_forward_hook(
        lambda m, i, o: calls.append((int(i[1]), not lora_layer.disable_adapters, o.sample.requires_grad)))
    k = 2
    roll = image_rollout(policy, PROMPTS, k, torch.Generator().manual_seed(0), use_checkpoint=False)
    hook.remove()
    late = {int(t) for t in policy.schedule.timesteps[-k:]}
    assert {t for t, _, _ in calls} == {int(t) for t in policy.schedule.timesteps}
    assert not any(grad for t, _, grad in calls if t not in late)  # no graph before step T-K
    assert all(grad for t, on, grad in calls if t in late and on)  # the fine-tuned pass of the last K has one
    # before the last K the UNet does not act (finetune.early_steps: auto): the pretrained model's pass only
    assert all(not on for t, on, _ in calls if t not in late)
    (roll.x0.square().mean() - roll.kl.mean()).backward()
    lora = [p for n, p in policy.unet.named_parameters() if "lora" in n]
    assert all(p.grad is not None for p in lora) and sum(p.grad.abs().sum() for p in lora) > 0


def test_checkpointed_steps_give_the_same_gradients_as_plain_steps() -> None:
    """Activation checkpointing of whole steps recomputes the reference pass with the adapters still disabled."""
    grads = []
    for use_checkpoint in (False, True):
        policy = build_policy(tiny_cfg("diffusion.steps=3"), torch.device("cpu"))
        _perturb_lora(policy.unet)
        roll = image_rollout(policy, PROMPTS, 2, torch.Generator().manual_seed(0), use_checkpoint=use_checkpoint)
        (roll.x0.square().mean() + roll.kl.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in policy.unet.named_parameters() if "lora" in n]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_in_process_fine_tuning_moves_only_the_lora_weights() -> None:
    cfg = tiny_cfg("finetune.steps=2", "finetune.batch_size=2")
    policy = build_policy(cfg, torch.device("cpu"))
    reward = load_image_reward(cfg, tiny_reward_bytes(cfg), "braid_bonus", torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in policy.unet.named_parameters()}
    tuner = ImageFineTuner(policy, reward, cfg, seed=0)
    history = tuner.train()
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["objective"]) and np.isfinite(h["g_hat"]) for h in history)
    assert history[0]["kl"] == 0.0 and np.isfinite(tuner.last_oracle)
    after = dict(policy.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_full_fine_tuning_trains_the_unet_against_a_frozen_copy() -> None:
    cfg = tiny_cfg("image.lora_rank=0", "finetune.steps=1", "finetune.batch_size=2", "diffusion.steps=3")
    policy = build_policy(cfg, torch.device("cpu"))
    assert policy.reference is not None and policy.reference is not policy.unet
    assert "reference" not in dict(policy.named_children())  # kept out of the module ZeRO would wrap
    frozen = {n: p.detach().clone() for n, p in policy.reference.named_parameters()}
    before = {n: p.detach().clone() for n, p in policy.unet.named_parameters()}
    reward = load_image_reward(cfg, tiny_reward_bytes(cfg), "strl", torch.device("cpu"))
    history = ImageFineTuner(policy, reward, cfg, seed=0).train()
    assert history[0]["kl"] == 0.0 and np.isfinite(history[0]["objective"])  # the copy starts identical
    assert any(not torch.equal(before[n], p) for n, p in policy.unet.named_parameters())
    assert all(torch.equal(frozen[n], p) and not p.requires_grad for n, p in policy.reference.named_parameters())


def test_the_unet_acts_on_the_last_k_steps_only_so_the_kl_is_the_whole_paths() -> None:
    """finetune.early_steps for images: before the last K steps the policy is the pretrained model, exactly, at
    training and at sampling; a rollout's KL then covers every step where the UNet acts."""
    cfg = tiny_cfg("diffusion.steps=6", "finetune.k=2")
    policy = build_policy(cfg, torch.device("cpu"))
    assert policy.active_steps == 2
    _perturb_lora(policy.unet)
    text = policy.encode_prompts(PROMPTS)
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(6):
            mean, mean_pre, _ = policy.means(x, i, text)
            assert torch.equal(mean, mean_pre) == (i < 4), i
    roll = image_rollout(policy, PROMPTS, 2, torch.Generator().manual_seed(1))
    assert (roll.kl_per_step[:4] == 0).all() and (roll.kl_per_step[4:] > 0).all() and roll.early == []


def test_early_steps_where_the_unet_acts_pay_their_kl() -> None:
    """early_steps=kl (or a K drawn below finetune.k): the UNet acts before the last K steps and pays KL there,
    at the detached x_t, equal to the KL recomputed by brute force, with a gradient to the adapters only."""
    from braid_ray.images.sampler import image_early_kl

    cfg = tiny_cfg("diffusion.steps=5", "finetune.early_steps=kl")
    policy = build_policy(cfg, torch.device("cpu"))
    assert policy.active_steps is None
    _perturb_lora(policy.unet)
    roll = image_rollout(policy, PROMPTS, 2, torch.Generator().manual_seed(0))
    assert [s.i for s in roll.early] == [0, 1, 2] and (roll.kl_per_step > 0).all()
    paid = image_early_kl(policy, roll)
    brute = sum(((m - mp) ** 2).sum((1, 2, 3)) / (2 * sg**2)
                for m, mp, sg in (policy.means(s.x_t, s.i, roll.text) for s in roll.early))
    torch.testing.assert_close(paid.detach(), roll.kl_early, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(paid.detach(), brute.detach(), rtol=1e-4, atol=1e-6)
    paid.mean().backward()
    lora = [p for n, p in policy.unet.named_parameters() if "lora" in n]
    assert sum(p.grad.abs().sum() for p in lora if p.grad is not None) > 0

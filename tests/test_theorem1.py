"""Theorem 1 on an enumerable space: fine-tuning at alpha moves the sampler toward exp(r / alpha) p_pre / Z.

All 4^3 sequences of length 3; a reward linear in x0 (exact on the continuous sample); pretraining data =
+-1 one-hot plus N(0, 0.4^2) noise from a random distribution over the 64 sequences; T = 10 steps, full
backpropagation (K = T), the residual parameterisation mu = mu_pre + sigma_t^2 c(x_t, t), Adam lr 5e-3 with
cosine decay over 600 steps (measured TV ratios 0.30 and 0.34 on two other seeds; 0.53-0.60 at lr 2e-3). p_pre is the
pretrained sampler's own histogram (20k samples; two 20k histograms differ by TV about 0.03).
"""

from __future__ import annotations

import pytest
import torch

from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.finetune import FineTuner

L, T, ALPHA, N_HIST = 3, 10, 0.5, 20_000
ALL = torch.tensor([[i // 16, (i // 4) % 4, i % 4] for i in range(64)])


def _histogram(backbone: GaussianOneHotDiffusion, x0: torch.Tensor) -> torch.Tensor:
    codes = backbone.decode(x0)
    return torch.bincount(codes[:, 0] * 16 + codes[:, 1] * 4 + codes[:, 2], minlength=64).double() / len(codes)


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


@pytest.mark.slow
def test_fine_tuned_sampler_moves_toward_the_tilted_target() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = GaussianOneHotDiffusion(L, steps=T, eta=1.0)
    p_data = torch.distributions.Dirichlet(torch.ones(64)).sample()
    model = ConvDenoiser(L, channels=32, blocks=2, kernel_size=3, emb_dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(800):
        idx = torch.multinomial(p_data, 256, replacement=True, generator=g)
        x0 = backbone.encode(ALL[idx]) + 0.4 * torch.randn(256, L, 4, generator=g)
        loss = backbone.loss(model, x0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p_pre = _histogram(backbone, backbone.sample(model, N_HIST, g))

    w = torch.randn(L, 4, generator=g) * 0.5

    def reward(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = (x0 * w).sum((1, 2))
        return r, torch.zeros_like(r)

    r_vertices = (backbone.encode(ALL) * w).sum((1, 2)).double()
    target = torch.exp(r_vertices / ALPHA) * p_pre
    target /= target.sum()

    tuner = FineTuner(FineTunedPolicy(backbone, model, "residual"), reward, alpha=ALPHA, k=T, batch_size=256,
                      lr=5e-3, steps=600, clip=1.0, seed=0, use_checkpoint=False)
    history = tuner.train()
    p_ft = _histogram(backbone, tuner.sample_designs(N_HIST))
    tv_pre, tv_ft = _tv(p_pre, target), _tv(p_ft, target)
    assert tv_pre > 0.3, "the test needs a target far from p_pre"
    assert tv_ft <= 0.5 * tv_pre, (tv_ft, tv_pre)
    assert history[-1]["kl"] > 0 and history[-1]["objective"] > history[0]["objective"]

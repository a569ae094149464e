"""Log-likelihood of sequences under the pretrained diffusion model: a variational lower bound, in nats.
``elbo`` / ``elbo_terms`` dispatch on the backbone: the Gaussian one-hot diffusion (below) or the masked one
(``masked_elbo_terms``, the last section of this docstring).

The Gaussian bound (DDPM's, Ho et al. 2020 eq. 5, written with DDIM's posteriors, Song et al. 2021 eq. 7), for
x_0 = encode(codes) in {-1, +1}^(L x 4):

    log p_theta(codes) >= ELBO = E_q[ log p_theta(codes | x_1) ]                                   reconstruction
                                 - sum_{t=2..T} E_q[ KL(q_sigma(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) ]
                                 - KL(q(x_T | x_0) || N(0, I))                                       prior

- q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I): the forward process of ``GaussianOneHotDiffusion.loss``
  (ab_t = alpha_bar_t of the cosine ``Schedule``).
- q_sigma(x_{t-1} | x_t, x_0) = N(sqrt(ab_{t-1}) x_0 + c_t eps, sigma_t^2 I), eps = (x_t - sqrt(ab_t) x_0) /
  sqrt(1 - ab_t), c_t = sqrt(1 - ab_{t-1} - sigma_t^2), with the sampler's own sigma_t (``Schedule.sigma2``).
  For every sigma_t^2 <= 1 - ab_{t-1} (DDIM eta in (0, 1]) it keeps the marginals q(x_t | x_0), so the bound
  holds; at eta = 1 it is DDPM's posterior q(x_{t-1} | x_t, x_0) and this is exactly DDPM's bound.
- p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I): the backbone's ``policy``, mu_theta =
  sqrt(ab_{t-1}) x0_hat + c_t eps_hat. Equal variances, so KL_t = ||mu_q - mu_theta||^2 / (2 sigma_t^2), summed
  over the 4L coordinates; mu_q - mu_theta = (c_t - sqrt(ab_{t-1}) sqrt(1 - ab_t) / sqrt(ab_t)) (eps - eps_hat),
  which is how it is computed (no cancellation between two nearly equal means).
- Prior: p(x_T) = N(0, I) (``backbone.prior``); ||x_0||^2 = 4L for every sequence, so
  KL(q(x_T | x_0) || N(0, I)) = -2L log(1 - ab_T), the same constant for every sequence (about 1e-6 nats
  with the cosine schedule).
- Reconstruction (decoder): the last policy step N(mu_theta(x_1, 1), sigma_1^2 I) restricted to the four
  valid one-hot vertices v_a = 2 e_a - 1 of each position and renormalised. ||v_a - mu||^2 = 4 - 2 v_a.mu +
  ||mu||^2 with v_a.mu = 2 mu_a - sum(mu), so p_theta(a | x_1) = softmax_a(2 mu_a / sigma_1^2) per position.
  With this decoder the ELBO bounds the log-probability of the discrete sequence: it is <= 0, and a model
  that knows nothing (every letter uniform) has log-likelihood -L ln 4. (The sampler itself decodes by the
  argmax of x_0 = mu + sigma_1 z; this decoder is the same Gaussian, conditioned on landing on a vertex.)

The bound is the denoiser's, without the sampler's clipping of x0_hat to [-1, 1] (``clip_x0``, the default
when sampling): clipping makes mu_theta non-linear in eps_hat, and the eps form below needs it linear. As a
validity score this ranks designs by how well the pretrained denoiser explains them.

Estimator. The prior in closed form. The reconstruction (t = 1) with one draw of x_1 per sequence. The KLs
at t = 2..T-1 by stratified sampling: {2, ..., T-1} is cut into ``t_samples`` contiguous strata of near-equal
size n_j, one t is drawn uniformly in each with one noise draw, and its KL is weighted by n_j (unbiased; the
exact sum over t when t_samples >= T - 2). So a sequence costs min(t_samples, T - 2) + 1 denoiser evaluations.

The KL at t = T separately, from ``final_draws`` draws shared by all sequences. The cosine schedule clips
beta_T at 0.999, so ab_T = ab_{T-1} / 1000 and w_T (KL_T = w_T ||eps - eps_hat||^2) is ~500 at T = 50,
against <= 1.5 for every other step: the model's eps error at x_T is amplified by sqrt(ab_{T-1} / ab_T) =
31.6 in its mean. A single draw of that term would swing every ELBO by hundreds of nats. But x_T hardly
depends on x_0 (sqrt(ab_T) ~ 1e-3), so x_T^m = sqrt(1 - ab_T) z_m, z_m ~ N(0, I), is drawn once from
r = N(0, (1 - ab_T) I), the model is run once per draw, and each sequence re-weights the draws by
q(x_T^m | x_0) / r(x_T^m) = exp(sqrt(ab_T / (1 - ab_T)) x_0.z_m - 2L ab_T / (1 - ab_T)) (self-normalised
importance sampling: the weights are within ~1% of 1, the bias is O(Var(w) / M)). Its cost is
``final_draws`` evaluations per call, not per sequence.

Common random numbers (the default): every sequence is evaluated at the same sampled steps with the same
noise draws. Each sequence's estimate is still unbiased, and the differences between sequences (a design
against the data's percentile, one method against another) carry no independent sampling noise; the
estimates depend only on (codes, seed), not on the batch size or on the other rows. ``common_noise=False``
draws the steps and the noise of t = 1..T-1 independently for each sequence instead. The noise is drawn on
the CPU, so the values are the same on any device.

The masked backbone (``masked.MaskedDiffusion``, alpha_t = 1 - t/T). Its T-step sampler's bound (MDLM eq. 8 with
the SUBS parameterisation) is

    log p_theta(codes) >= ELBO = - sum_{t=1..T} E_{q(z_t | x_0)}[ (1/t) sum_{l masked} -log p_theta(x_0^l | z_t) ]

(KL_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t) = 1 / t times the masked letters' cross-entropy). The prior term is
0 (z_T is all masked under q and p) and so is the reconstruction (alpha_0 = 1: z_0 = x_0), so the ELBO is <= 0,
and a model that knows nothing (every letter uniform) has exactly -L ln 4. Estimator: {1, ..., T} is cut into
``t_samples`` contiguous strata, one t drawn uniformly in each with one draw of the mask (each position masked
with probability t / T), weighted by the stratum's size (unbiased; the exact sum over t when t_samples >= T);
the same common random numbers as above by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.masked import MaskedDiffusion
from braid_ray.diffusion.schedule import Schedule

ELBO_T_SAMPLES = 8  # sampled steps t in 2..T-1 per sequence (plus t = 1 per sequence); the eval default
ELBO_FINAL_DRAWS = 256  # draws of x_T shared by all sequences for the KL at t = T
FORWARD_POSITIONS = 2**17  # denoiser evaluations per batch x sequence length (memory bound of one forward)


def unsupported(backbone: object) -> str | None:
    """Why the ELBO cannot be computed for ``backbone`` (a sentence), or None when it can."""
    if isinstance(backbone, MaskedDiffusion):
        return None
    if not isinstance(backbone, GaussianOneHotDiffusion):
        return (f"the ELBO is implemented for GaussianOneHotDiffusion and MaskedDiffusion only, not "
                f"{type(backbone).__name__}")
    eta = backbone.schedule.eta
    if not 0 < eta <= 1:
        return (f"the ELBO needs a stochastic sampler with DDIM eta in (0, 1] (every sigma_t > 0 and the "
                f"posterior q_sigma well defined), got diffusion.eta={eta}")
    return None


def posterior(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Mean (B, L, 4) and variance (B,) of q_sigma(x_{t-1} | x_t, x_0) for steps t (B,) in 2..T (float64)."""
    ab, ab_prev, sigma2 = _per_row(schedule, t)
    eps = (x_t.double() - ab.sqrt()[:, None, None] * x0.double()) / (1 - ab).sqrt()[:, None, None]
    c = (1 - ab_prev - sigma2).clamp_min(0).sqrt()
    return ab_prev.sqrt()[:, None, None] * x0.double() + c[:, None, None] * eps, sigma2


def model_mean(schedule: Schedule, eps_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               clip_x0: bool = False) -> torch.Tensor:
    """mu_theta(x_t, t) (B, L, 4) from the predicted noise eps_hat at steps t (B,): the policy's mean, batched
    over rows with different t (``GaussianOneHotDiffusion.policy`` takes one t), with its x0 clipping."""
    ab, ab_prev, sigma2 = _per_row(schedule, t)
    c = torch.where(t > 1, (1 - ab_prev - sigma2).clamp_min(0).sqrt(), torch.zeros_like(ab))
    x_t, eps_hat = x_t.double(), eps_hat.double()
    x0_hat = (x_t - (1 - ab).sqrt()[:, None, None] * eps_hat) / ab.sqrt()[:, None, None]
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps_hat = (x_t - ab.sqrt()[:, None, None] * x0_hat) / (1 - ab).sqrt()[:, None, None]
    return ab_prev.sqrt()[:, None, None] * x0_hat + c[:, None, None] * eps_hat


def _per_row(schedule: Schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = t.cpu().long()
    return schedule.alpha_bar[t], schedule.alpha_bar[t - 1], schedule.sigma2[t]


def kl_weights(schedule: Schedule) -> torch.Tensor:
    """w_t (T + 1,), float64, with KL_t = w_t ||eps - eps_hat||^2 for t >= 2 (w_0 = w_1 = 0)."""
    ab, sigma2 = schedule.alpha_bar, schedule.sigma2
    w = torch.zeros(schedule.steps + 1, dtype=torch.float64)
    for t in range(2, schedule.steps + 1):
        c = math.sqrt(max(1 - float(ab[t - 1]) - float(sigma2[t]), 0.0))
        coef = c - math.sqrt(float(ab[t - 1])) * math.sqrt(1 - float(ab[t])) / math.sqrt(float(ab[t]))
        w[t] = coef**2 / (2 * float(sigma2[t]))
    return w


def strata(steps: int, t_samples: int) -> list[np.ndarray]:
    """{2, ..., T-1} cut into min(t_samples, T - 2) contiguous strata of near-equal size (none when T <= 2)."""
    if t_samples < 1:
        raise ValueError(f"t_samples: expected at least one sampled step per sequence, got {t_samples}")
    if steps < 3:
        return []
    return list(np.array_split(np.arange(2, steps), min(t_samples, steps - 2)))


def _check(backbone: GaussianOneHotDiffusion | MaskedDiffusion, codes: np.ndarray) -> np.ndarray:
    reason = unsupported(backbone)
    if reason:
        raise ValueError(reason)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != backbone.length or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes: expected integer codes of shape (N, {backbone.length}) for this model, got "
                         f"{codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 3):
        raise ValueError(f"codes: expected values in 0..3 (0=A, 1=C, 2=G, 3=T), got {codes.min()}..{codes.max()}")
    return codes


def final_step_kl(backbone: GaussianOneHotDiffusion, model: nn.Module, codes: torch.Tensor, draws: int,
              g: torch.Generator, device: torch.device, rows: int) -> np.ndarray:
    """E_{q(x_T | x_0)} KL_T for each sequence (N,), by self-normalised importance sampling from ``draws`` x_T
    shared by all sequences (see the module docstring)."""
    s, big_t, length = backbone.schedule, backbone.schedule.steps, codes.shape[1]
    ab = float(s.alpha_bar[big_t])
    w_t = float(kl_weights(s)[big_t])
    z = torch.randn(draws, length, 4, generator=g)
    eps_hat = torch.cat([model(chunk.to(device), torch.full((len(chunk),), big_t, device=device)).float().cpu()
                         for chunk in (math.sqrt(1 - ab) * z).split(rows)])
    # eps(x_T^m, x_0) = z_m - c x_0 with c = sqrt(ab_T / (1 - ab_T)); d_m = z_m - eps_hat_m
    c = math.sqrt(ab / (1 - ab))
    d = (z - eps_hat).reshape(draws, -1).double()  # (M, 4L)
    z = z.reshape(draws, -1).double()
    out = []
    for chunk in codes.split(max(1, 2**22 // draws)):  # (rows, M) blocks of ~4M entries
        x0 = backbone.encode(chunk).reshape(len(chunk), -1).double()  # (rows, 4L)
        sq = (d**2).sum(1)[None, :] - 2 * c * x0 @ d.T + c**2 * 4 * length  # ||d_m - c x_0||^2
        weights = torch.softmax(c * x0 @ z.T, dim=1)  # q / r, normalised (the rest of log q / r is constant)
        out.append(w_t * (weights * sq).sum(1))
    return torch.cat(out).numpy()


def elbo_terms(backbone: GaussianOneHotDiffusion | MaskedDiffusion, model: nn.Module, codes: np.ndarray, *,
               t_samples: int = ELBO_T_SAMPLES, final_draws: int = ELBO_FINAL_DRAWS, seed: int = 0,
               common_noise: bool = True, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """The ELBO of int codes (N, L) under ``model`` (the backbone's denoiser) and its three terms, each (N,) float64
    nats: ``reconstruction`` (<= 0), ``diffusion`` (the summed KLs, >= 0), ``prior`` (>= 0) and
    ``elbo`` = reconstruction - diffusion - prior. ``batch_size``: denoiser evaluations per forward pass
    (default: FORWARD_POSITIONS // L). The model runs on its own device, in eval mode. ``final_draws`` is the
    Gaussian backbone's (its t = T estimator)."""
    if isinstance(backbone, MaskedDiffusion):
        return masked_elbo_terms(backbone, model, codes, t_samples=t_samples, seed=seed, common_noise=common_noise,
                                 batch_size=batch_size)
    return gaussian_elbo_terms(backbone, model, codes, t_samples=t_samples, final_draws=final_draws, seed=seed,
                               common_noise=common_noise, batch_size=batch_size)


def _model_device(model: nn.Module) -> torch.device:
    weight_param = next(model.parameters(), None)
    return weight_param.device if weight_param is not None else torch.device("cpu")


@torch.no_grad()
def gaussian_elbo_terms(backbone: GaussianOneHotDiffusion, model: nn.Module, codes: np.ndarray, *,
                        t_samples: int = ELBO_T_SAMPLES, final_draws: int = ELBO_FINAL_DRAWS, seed: int = 0,
                        common_noise: bool = True, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """``elbo_terms`` of the Gaussian backbone (``model`` an eps predictor)."""
    codes = _check(backbone, codes)
    if final_draws < 1:
        raise ValueError(f"final_draws: expected at least one draw of x_T, got {final_draws}")
    schedule, n, length = backbone.schedule, codes.shape[0], codes.shape[1]
    parts = strata(schedule.steps, t_samples)
    k = 1 + len(parts)  # slots per sequence: t = 1 (reconstruction), then one step per stratum (weight n_j)
    weight = torch.tensor([0.0] + [float(len(p)) for p in parts], dtype=torch.float64)
    lo = torch.tensor([int(p[0]) for p in parts], dtype=torch.long)
    size = torch.tensor([len(p) for p in parts], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    draws = 1 if common_noise else n
    sampled = lo + torch.minimum((torch.rand(draws, len(parts), generator=g, dtype=torch.float64) * size).long(),
                                 size - 1)
    t_all = torch.cat([torch.ones(draws, 1, dtype=torch.long), sampled], 1)  # (draws, k)
    eps_all = torch.randn(1, k, length, 4, generator=g) if common_noise else None
    w = kl_weights(schedule)
    sqrt_ab, sqrt_1mab = schedule.alpha_bar.sqrt().float(), (1 - schedule.alpha_bar).sqrt().float()
    sigma2_1 = float(schedule.sigma2[1])
    device = _model_device(model)
    was_training = model.training
    model.eval()
    forward_rows = batch_size or max(1, FORWARD_POSITIONS // length)
    rows = max(1, forward_rows // k)
    all_codes = torch.from_numpy(codes.astype(np.int64))
    final = np.zeros(n)
    if schedule.steps >= 2 and n:
        final = final_step_kl(backbone, model, all_codes, final_draws, torch.Generator().manual_seed(seed + 1),
                          device, forward_rows)
    recon, diffusion = np.zeros(n), final.copy()
    for start in range(0, n, rows):
        c = all_codes[start:start + rows]
        b = len(c)
        if common_noise:
            t, eps = t_all.expand(b, -1), eps_all.expand(b, -1, -1, -1)
        else:
            t, eps = t_all[start:start + b], torch.randn(b, k, length, 4, generator=g)
        t, eps = t.reshape(-1), eps.reshape(b * k, length, 4)
        x0 = backbone.encode(c).repeat_interleave(k, 0)
        x_t = sqrt_ab[t][:, None, None] * x0 + sqrt_1mab[t][:, None, None] * eps
        eps_hat = model(x_t.to(device), t.to(device)).float().cpu()
        first = torch.arange(b * k) % k == 0  # the t = 1 slot of each sequence
        # Reconstruction: log softmax(2 mu / sigma_1^2) at the true letter, mu = mu_theta(x_1, 1) = x0_hat.
        mu = model_mean(schedule, eps_hat[first], x_t[first], t[first])
        log_p = torch.log_softmax(2 * mu / sigma2_1, dim=-1).gather(-1, c[:, :, None]).squeeze(-1)
        recon[start:start + b] = log_p.sum(1).numpy()
        sq = ((eps - eps_hat) ** 2).sum((1, 2)).double().reshape(b, k)  # ||eps - eps_hat||^2
        kl = w[t].reshape(b, k) * sq  # w_1 = 0: the reconstruction slot adds nothing here
        diffusion[start:start + b] += (kl * weight).sum(1).numpy()
    model.train(was_training)
    prior = np.full(n, -2 * length * math.log1p(-float(schedule.alpha_bar[-1])))
    return {"reconstruction": recon, "diffusion": diffusion, "prior": prior, "elbo": recon - diffusion - prior}


@torch.no_grad()
def masked_elbo_terms(backbone: MaskedDiffusion, model: nn.Module, codes: np.ndarray, *,
                      t_samples: int = ELBO_T_SAMPLES, seed: int = 0, common_noise: bool = True,
                      batch_size: int | None = None) -> dict[str, np.ndarray]:
    """``elbo_terms`` of the masked backbone (``model`` its x0-logit denoiser); see the module docstring."""
    codes = _check(backbone, codes)
    if t_samples < 1:
        raise ValueError(f"t_samples: expected at least one sampled step per sequence, got {t_samples}")
    steps, (n, length) = backbone.steps, codes.shape
    parts = np.array_split(np.arange(1, steps + 1), min(t_samples, steps))  # strata of {1, ..., T}
    k = len(parts)
    weight = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    lo = torch.tensor([int(p[0]) for p in parts], dtype=torch.long)
    size = torch.tensor([len(p) for p in parts], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    draws = 1 if common_noise else n
    t_all = lo + torch.minimum((torch.rand(draws, k, generator=g, dtype=torch.float64) * size).long(), size - 1)
    u_all = torch.rand(1, k, length, generator=g) if common_noise else None
    device = _model_device(model)
    was_training = model.training
    model.eval()
    rows = max(1, (batch_size or max(1, FORWARD_POSITIONS // length)) // k)
    all_codes = torch.from_numpy(codes.astype(np.int64))
    diffusion = np.zeros(n)
    for start in range(0, n, rows):
        c = all_codes[start:start + rows]
        b = len(c)
        if common_noise:
            t, u = t_all.expand(b, -1), u_all.expand(b, -1, -1)
        else:
            t, u = t_all[start:start + b], torch.rand(b, k, length, generator=g)
        t, u = t.reshape(-1), u.reshape(b * k, length)
        x0 = backbone.encode(c).repeat_interleave(k, 0)
        mask = u < (t.float() / steps)[:, None]  # q(z_t | x_0): each letter masked with probability 1 - alpha_t = t/T
        z = torch.where(mask[..., None], torch.full_like(x0, -1.0), x0)
        logits = backbone.logits(model, z.to(device), (t.float() / steps).to(device)).float().cpu()
        nll = -torch.log_softmax(logits, -1).gather(-1, c.repeat_interleave(k, 0)[..., None]).squeeze(-1)
        kl = (nll * mask).sum(1).double() / t.double()  # KL_t = (1 / t) sum_{l masked} -log p_theta(x_0^l | z_t)
        diffusion[start:start + b] = (kl.reshape(b, k) * weight).sum(1).numpy()
    model.train(was_training)
    zero = np.zeros(n)
    return {"reconstruction": zero, "diffusion": diffusion, "prior": zero.copy(), "elbo": -diffusion}


def describe(backbone: GaussianOneHotDiffusion | MaskedDiffusion) -> str:
    """What the ELBO of ``backbone`` is, in one sentence for a report."""
    if isinstance(backbone, MaskedDiffusion):
        return ("the variational lower bound of the masked T-step sampler on log p(sequence) under the pretrained "
                f"model (braid_ray/diffusion/likelihood.py; per sequence {ELBO_T_SAMPLES} stratified steps, the same draws "
                "for every sequence, so differences between designs are sharper than the level)")
    return ("DDPM's variational lower bound on log p(sequence) under the pretrained model, with a categorical "
            f"decoder (braid_ray/diffusion/likelihood.py; per sequence the steps t = 1 and T and {ELBO_T_SAMPLES} "
            "sampled steps, the same draws for every sequence, so differences between designs are sharper than "
            "the level)")


def elbo(backbone: GaussianOneHotDiffusion | MaskedDiffusion, model: nn.Module, codes: np.ndarray, *,
         t_samples: int = ELBO_T_SAMPLES, final_draws: int = ELBO_FINAL_DRAWS, seed: int = 0, common_noise: bool = True,
         batch_size: int | None = None) -> np.ndarray:
    """The ELBO (N,) in nats of int codes (N, L): a lower bound on log p_theta(codes); see the module docstring."""
    return elbo_terms(backbone, model, codes, t_samples=t_samples, final_draws=final_draws, seed=seed,
                      common_noise=common_noise, batch_size=batch_size)["elbo"]

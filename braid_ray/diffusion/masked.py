"""Masked (absorbing-state) discrete diffusion over the alphabet: MDLM's SUBS parameterisation (Sahoo et al. 2024)
with a log-linear schedule, behind the same backbone interface as ``gaussian.GaussianOneHotDiffusion``.

State. x_t in {-1, +1}^(L x 4): a letter is its one-hot scaled to +-1 (what ``encode`` gives, as for the Gaussian
backbone), a masked position is all -1 (no letter). x_T is all masked; x_0 holds no mask.

Forward process. Each letter of x is kept with probability alpha(s) and masked otherwise, at time s in [0, 1],
with the log-linear schedule alpha(s) = 1 - s (MDLM's sigma(s) = -log(1 - s)). Step t = T..1 of the sampler goes
from s = t/T to (t-1)/T, so alpha_t = 1 - t/T.

Denoiser. The same 1D conv family as the Gaussian backbone's, with five input channels (the four letters and the
mask token) and told the time as ``TIME_SCALE * s``; its four outputs are the logits of p_theta(x_0^l | x_t), the
x0 prediction. SUBS: the prediction puts no mass on the mask token, and unmasked positions are carried over
(the prediction there is not used).

Reverse step t at a masked position (the posterior q(x_{t-1} | x_t, x_0) with x_0 ~ p_theta):
    unmask to letter j   with probability (alpha_{t-1} - alpha_t) / (1 - alpha_t) * p_theta(j | x_t) = p_theta(j) / t
    stay masked          with probability (1 - alpha_{t-1}) / (1 - alpha_t)                            = (t - 1) / t
At t = 1 every position still masked is unmasked, so samples hold no mask token; ``decode`` is the final argmax
of the one-hot.

Pretraining loss (continuous time, MDLM eq. 11): the NELBO
    E_s[ -alpha'(s) / (1 - alpha(s)) * sum_{l masked in z_s} -log p_theta(x^l | z_s) ],  -alpha' / (1 - alpha) = 1 / s,
with s drawn low-discrepancy over the batch (one uniform offset, rows spread evenly) in [MIN_TIME, 1], per position.
The ELBO of the T-step sampler is in ``likelihood.py``.

Fine-tuning (``step`` with a graph). A masked position's next value is one of five outcomes (four letters, stay
masked); it is drawn by Gumbel-max from the step's noise, and carried as a straight-through one-hot: the hard
one-hot forward (x_{t-1} is exactly a state, the reward sees a hard sequence) and the gradient of the
Gumbel-softmax at ``temperature`` backward. The per-step KL is exact: at a masked position the stay probability is
the same under both policies, so KL = (1 / t) KL(p_theta(. | x_t) || p_pre(. | x_t)) over the letters; an unmasked
position is carried over under both (KL 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from braid_ray.config import DiffusionConfig
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion

TIME_SCALE = 1000.0  # the denoiser is told the time s in [0, 1] as TIME_SCALE * s (the sinusoidal embedding's range)
MIN_TIME = 1e-3  # the pretraining loss draws s in [MIN_TIME, 1] (its weight 1 / s is unbounded at 0; MDLM's eps)


class MaskedDiffusion:
    """``temperature``: the Gumbel-softmax temperature of the straight-through samples' backward pass (fine-tuning);
    forward, every sample is an exact draw from the step's categorical whatever the temperature."""

    in_channels = 5  # the denoiser's input: four letters and the mask token
    stochastic = True  # every reverse step draws from a categorical: its KL is always defined
    steps_per_row = True  # policy / net / correct / kl also take t as one step per row (B,) (sampler.early_kl)

    def __init__(self, length: int, steps: int = 50, temperature: float = 0.5):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.length, self.steps, self.temperature = length, steps, temperature

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, length: int, temperature: float = 0.5,
                    straight_through: bool = False) -> MaskedDiffusion:
        """From a DiffusionConfig; its samples are always straight-through (``straight_through`` is the Gaussian's)."""
        return cls(length, cfg.steps, temperature)

    # ---- data <-> diffusion space: the Gaussian backbone's +-1 one-hot (decode is the final argmax)
    encode = staticmethod(GaussianOneHotDiffusion.encode)
    decode = staticmethod(GaussianOneHotDiffusion.decode)

    @staticmethod
    def reward_input(x0: torch.Tensor) -> torch.Tensor:
        """The one-hot (N, L, 4) of x0: exactly one-hot forward (x0 is a hard sample), the Gumbel-softmax's gradient
        backward (carried by x0's straight-through graph)."""
        return (x0 + 1) / 2

    @staticmethod
    def masked(x: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the positions of x (B, L, 4) that hold the mask token (no letter)."""
        return x.amax(-1) < 0

    @staticmethod
    def features(x: torch.Tensor) -> torch.Tensor:
        """The denoiser's input (B, L, 5): the letters' one-hot and the mask token's indicator."""
        letters = (x + 1) / 2
        return torch.cat([letters, 1 - letters.sum(-1, keepdim=True)], dim=-1)

    # ---- the forward process and pretraining
    def prior(self, n: int, generator: torch.Generator | None = None,
              device: torch.device | None = None) -> torch.Tensor:
        """x_T: every position masked."""
        return torch.full((n, self.length, 4), -1.0, device=device)

    def _time(self, s: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
        if torch.is_tensor(s):
            return TIME_SCALE * s.to(device, torch.float32)
        return torch.full((n,), TIME_SCALE * s, device=device)

    def logits(self, model: nn.Module, x_t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """The denoiser's x0 logits (B, L, 4) at x_t and time s in [0, 1] (a float, or one per row (B,))."""
        return model(self.features(x_t), self._time(s, x_t.shape[0], x_t.device))

    def loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The continuous-time NELBO per position: the mean over rows of
        (1 / s) sum_{masked l} -log p_theta(x^l | z_s) / L."""
        n, length = x0.shape[:2]
        offset = torch.rand(1, generator=generator, device=x0.device)
        u = (offset + torch.arange(n, device=x0.device) / n) % 1  # low-discrepancy times over the batch
        s = MIN_TIME + (1 - MIN_TIME) * u
        mask = torch.rand(n, length, generator=generator, device=x0.device) < s[:, None]  # 1 - alpha(s) = s
        z = torch.where(mask[..., None], torch.full_like(x0, -1.0), x0)
        log_p = torch.log_softmax(self.logits(model, z, s), dim=-1)
        nll = -(log_p * (x0 + 1) / 2).sum(-1)  # -log p_theta(x^l | z_s) at every position
        return ((nll * mask).sum(1) / s).mean() / length

    # ---- the reverse process
    def policy(self, model: nn.Module, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The logits (B, L, 4) of p_theta(x_0^l | x_t), the x0 prediction that sets step t's transition (``step``)."""
        return self.logits(model, x_t, t / self.steps)

    def prediction(self, model: nn.Module, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the x0 logits (B, L, 4) of step t, the predicted x0 (B, L, 4)): at a masked position the expected +-1
        one-hot under p_theta(x_0^l | x_t), 2 p_theta - 1; elsewhere the letter that is carried over."""
        logits = self.policy(model, x_t, t)
        return logits, torch.where(self.masked(x_t)[..., None], 2 * torch.softmax(logits, -1) - 1, x_t)

    @staticmethod
    def guide(logits: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """Discrete classifier guidance of a step: the x0 logits tilted by the first-order (Taylor) estimate of the
        reward's change over the letter at each position (Nisonoff et al. 2024's TAG). With ``grad`` (B, L, 4) the
        gradient w.r.t. x0 at the predicted x0, putting letter j at position l changes the reward by about
        dr/dp_lj = 2 grad_lj (x0 = 2 p - 1, p the one-hot) up to a term common to every j, so
        p(j) -> p(j) exp(scale dr/dp_lj) / Z: exact for a reward linear in the one-hot. Only the letter a position
        unmasks to is tilted, not the step it unmasks at."""
        return logits + scale * 2 * grad

    def net(self, model: nn.Module, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The raw output (B, L, 4) of a denoiser-shaped network at step t (the fine-tuning correction)."""
        return self.logits(model, x_t, t / self.steps)

    @staticmethod
    def correct(pre: torch.Tensor, c: torch.Tensor, t: int | torch.Tensor, parameterization: str) -> torch.Tensor:
        """The fine-tuned x0 logits, pre + c: the correction adds to the pretrained logits (``shift`` and ``residual``
        alike: the masked transition has no variance to scale by). A zero correction is exactly the pretrained
        policy (KL exactly 0)."""
        return pre + c

    @staticmethod
    def noise(x_t: torch.Tensor, t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel(0, 1) noise (B, L, 5) for the five outcomes of every position."""
        u = torch.rand((*x_t.shape[:2], 5), generator=generator, device=x_t.device)  # in [0, 1)
        return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))

    def step(self, logits: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} (B, L, 4) from the x0 logits (B, L, 4): masked positions unmask to letter j with probability
        p(j) / t or stay masked with (t - 1) / t, by Gumbel-max on ``noise``, as a straight-through one-hot; the
        others are carried over."""
        stay = math.log((t - 1) / t) if t > 1 else -math.inf
        log_p = torch.log_softmax(logits, dim=-1)
        outcome = torch.cat([log_p - math.log(t), torch.full_like(log_p[..., :1], stay)], dim=-1)  # (B, L, 5)
        perturbed = outcome + noise
        hard = F.one_hot(perturbed.argmax(-1), 5).to(log_p.dtype)
        if torch.is_grad_enabled() and log_p.requires_grad:
            soft = torch.softmax(perturbed / self.temperature, dim=-1)
            hard = hard + (soft - soft.detach())  # exactly hard forward (soft - soft is exactly 0), soft backward
        return torch.where(self.masked(x_t)[..., None], 2 * hard[..., :4] - 1, x_t)

    def kl(self, logits: torch.Tensor, logits_pre: torch.Tensor, x_t: torch.Tensor,
           t: int | torch.Tensor) -> torch.Tensor:
        """KL(p_t(.|x_t) || p_pre_t(.|x_t)) per sample (B,) from the two x0 logits: (1 / t) sum over the masked
        positions of KL(p_theta(.|x_t) || p_pre(.|x_t)) over the letters."""
        log_p, log_pre = torch.log_softmax(logits, dim=-1), torch.log_softmax(logits_pre, dim=-1)
        per_position = (log_p.exp() * (log_p - log_pre)).sum(-1)  # (B, L)
        return (per_position * self.masked(x_t)).sum(-1) / t

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, generator: torch.Generator | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """x0 (n, L, 4) by ancestral unmasking over T steps, without a graph."""
        x = self.prior(n, generator, device)
        for t in range(self.steps, 0, -1):
            x = self.step(self.policy(model, x, t), x, t, self.noise(x, t, generator))
        return x

"""The fine-tuning loop (Algorithm 1 of the paper): maximise E[r_hat - g_hat] - alpha * E[sum_t KL_t]
by backpropagation through the sampler's last K steps. STRL, BRAID-Boot and BRAID-Bonus are this same
loop with the reward's penalty mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from braid_ray.diffusion.sampler import FineTunedPolicy, Rollout, early_kl, rollout

# x0 (B, L, 4) -> (r_hat, g_hat), each (B,), differentiable in x0.
RewardFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# hard designs, codes (n, L) -> oracle scores (n,): monitoring only, never part of the objective.
Monitor = Callable[[np.ndarray], np.ndarray]


@dataclass
class StepMetrics:
    step: int
    objective: float  # mean((r_hat - g_hat) / reward_scale) - alpha * mean(KL)
    r_hat: float  # batch mean, label scale
    g_hat: float
    kl: float  # batch mean of the KL summed over the whole path (every step where the policy acts)
    kl_early: float  # its part from steps T..K+1 (paid at the detached x_t; 0 where the policy does not act)
    kl_last_step: float  # the t = 1 term alone
    grad_norm: float  # before clipping
    k: int  # differentiable steps this batch
    onehot_distance: float  # mean |x0| - 1 per coordinate: how far samples sit from the one-hot vertices
    # (always 0 for the masked backbone, whose samples are hard)
    oracle: float = math.nan  # mean oracle score of fresh samples, on monitored steps only (NaN otherwise)
    oracle_queries: int = 0  # oracle queries spent at this step


def _stochastic(backbone: object) -> bool:
    """Whether the backbone's steps are random (their KL defined): its ``stochastic``, else its schedule's eta > 0
    (the image sampler's)."""
    stochastic = getattr(backbone, "stochastic", None)
    return bool(stochastic) if stochastic is not None else backbone.schedule.eta > 0


class FineTuner:
    """One policy, one reward, one optimizer (created once), and the steps that update them.

    ``batch_size`` is per worker; data-parallel callers pass ``grad_sync``, which averages the gradients
    over workers after backward. The policy, the reward and the noise generator (``seed``, this worker's own)
    live on ``device``; K (with ``randomize_k``) comes from a CPU generator seeded by ``k_seed``, which every
    worker shares, so all ranks unroll the same number of steps (ZeRO-3 would hang otherwise). ``reward_scale`` divides the reward so that alpha means the same on every task
    (the std of y over D_off, so the reward is in z-score units). ``monitor``, when given, scores
    ``monitor_queries`` fresh hard samples with the oracle every ``monitor_every`` steps, for the r_hat-vs-r
    picture; the scores never reach the loss.
    """

    def __init__(self, policy: FineTunedPolicy, reward_fn: RewardFn, *, alpha: float, k: int, batch_size: int,
                 lr: float, steps: int, clip: float = 1.0, grad_accum: int = 1, randomize_k: bool = False,
                 reward_scale: float = 1.0, seed: int = 0, k_seed: int | None = None,
                 device: torch.device | None = None,
                 use_checkpoint: bool = True, lr_schedule: str = "cosine",
                 grad_sync: Callable[[list[torch.Tensor]], None] | None = None, monitor: Monitor | None = None,
                 monitor_every: int = 0, monitor_queries: int = 0):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if alpha > 0 and not _stochastic(policy.backbone):
            raise ValueError("alpha > 0 needs a stochastic sampler (eta > 0): the KL of deterministic steps is undefined")
        self.policy, self.reward_fn = policy, reward_fn
        self.alpha, self.k, self.batch_size, self.clip = alpha, k, batch_size, clip
        self.grad_accum, self.randomize_k, self.reward_scale = grad_accum, randomize_k, reward_scale
        self.total_steps, self.use_checkpoint, self.grad_sync = steps, use_checkpoint, grad_sync
        self.device = device or torch.device("cpu")
        self.params = [p for p in policy.trainable.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(steps, 1))
                          if lr_schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0))
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.k_generator = torch.Generator().manual_seed(seed if k_seed is None else k_seed)  # CPU, shared by ranks
        self.monitor, self.monitor_every, self.monitor_queries = monitor, monitor_every, monitor_queries
        self.step = 0

    def _k(self) -> int:
        if not self.randomize_k:
            return self.k
        return int(torch.randint(1, self.k + 1, (1,), generator=self.k_generator, device="cpu"))

    def sample(self, n: int, k: int) -> Rollout:
        return rollout(self.policy, n, k, self.generator, self.device, self.use_checkpoint)

    def loss(self, roll: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """-(mean((r_hat - g_hat) / scale) - alpha * mean(KL of the last K steps)) and the terms, for one rollout.

        The steps before the last K pay their KL through ``pay_early_kl``; the objective reported here counts
        the whole path's KL."""
        r_hat, g_hat = self.reward_fn(roll.x0)
        objective = ((r_hat - g_hat) / self.reward_scale).mean() - self.alpha * roll.kl.mean()
        kl = roll.kl.detach() + roll.kl_early
        terms = {"objective": objective.item() - self.alpha * roll.kl_early.mean().item(), "r_hat": r_hat.mean().item(),
                 "g_hat": g_hat.mean().item(), "kl": kl.mean().item(), "kl_early": roll.kl_early.mean().item(),
                 "kl_last_step": roll.kl_per_step[-1].item(),
                 "onehot_distance": (roll.x0.detach().abs() - 1).abs().mean().item()}
        return -objective, terms

    def pay_early_kl(self, roll: Rollout, weight: float) -> None:
        """Backward of ``weight * alpha * mean(KL)`` over the steps before the last K where the policy acts: the
        KL at the visited x_t (detached), in chunks of K steps, so memory stays flat in T."""
        if self.alpha == 0 or not roll.early:
            return
        chunk = max(1, self.k)
        for i in range(0, len(roll.early), chunk):
            (weight * self.alpha * early_kl(self.policy, roll.early[i:i + chunk]).mean()).backward()

    def train_step(self) -> StepMetrics:
        self.policy.trainable.train()
        self.optimizer.zero_grad(set_to_none=True)
        k = self._k()
        totals: dict[str, float] = {}
        for _ in range(self.grad_accum):
            roll = self.sample(self.batch_size, k)
            loss, terms = self.loss(roll)
            (loss / self.grad_accum).backward()
            self.pay_early_kl(roll, 1 / self.grad_accum)
            for key, v in terms.items():
                totals[key] = totals.get(key, 0.0) + v / self.grad_accum
        if self.grad_sync is not None:  # data-parallel: average gradients over workers
            self.grad_sync(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else math.inf))
        if not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in totals.values()):
            raise FloatingPointError(f"fine-tuning step {self.step + 1}: non-finite loss or gradient ({totals}, "
                                     f"grad norm {grad_norm}); the last good checkpoint is kept")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = StepMetrics(step=self.step, grad_norm=grad_norm, k=k, **totals)
        if self.monitor is not None and self.monitor_queries > 0 and self.monitor_every > 0 and (
                self.step % self.monitor_every == 0 or self.step == self.total_steps):
            # its own generator, so that monitoring leaves the training trajectory unchanged
            g = torch.Generator(device=self.device).manual_seed(int(self.generator.initial_seed()) + self.step)
            codes = self.policy.backbone.decode(self.sample_designs(self.monitor_queries, generator=g)).cpu().numpy()
            metrics.oracle = float(np.mean(self.monitor(codes)))
            metrics.oracle_queries = self.monitor_queries
        return metrics

    def train(self, steps: int | None = None, on_step: Callable[[StepMetrics], None] | None = None) -> list[dict]:
        history = []
        while self.step < (steps if steps is not None else self.total_steps):
            m = self.train_step()
            history.append(asdict(m))
            if on_step is not None:
                on_step(m)
        return history

    @torch.no_grad()
    def sample_designs(self, n: int, batch: int = 512, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 (n, L, 4) from the fine-tuned policy, without a graph (for evaluation)."""
        self.policy.trainable.eval()
        g = generator or self.generator
        out = [rollout(self.policy, min(batch, n - i), 1, g, self.device, False).x0 for i in range(0, n, batch)]
        # (without gradients K only splits the same loop in two; steps where the policy does not act stay
        # pretrained through policy.active_steps)
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"trainable": self.policy.trainable.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "generator": self.generator.get_state(), "k_generator": self.k_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        if "k_generator" in state:  # checkpoints before the shared K stream have none
            self.k_generator.set_state(state["k_generator"])

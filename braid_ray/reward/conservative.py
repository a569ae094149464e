"""The conservative reward r_hat - g_hat of BRAID (DESIGN.md), from a trained stacked ensemble.

Penalty modes, all from one checkpoint (r_hat is always the ensemble mean, so modes differ only in g_hat):
- ``none``  (STRL):        g_hat = 0
- ``min``   (BRAID-Boot):  r_hat - g_hat = min_m r_hat_m          (paper, Example 2)
- ``lcb``:                 g_hat = c * std_m r_hat_m
- ``bonus`` (BRAID-Bonus): g_hat = c * mean_m sqrt(lambda * phi_m^T (Phi_m^T Phi_m + lambda I)^{-1} phi_m)
                           on (whitened) last-layer features phi_m of member m (paper, Example 1)
For ``lcb`` and ``bonus``, c = k * std(r_hat) / std(g_raw) over D_off, so the strength k means the same on
every task: k = 1 makes the penalty vary as much as the reward does in distribution.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from braid_ray.reward.stacked import STACKS, StackedMLP, StackedNet, spec_kind

PENALTIES = ("none", "min", "lcb", "bonus")


def bonus_factor(phi: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factor of A = Phi^T Phi + lambda I for features phi (M, n, d) -> (M, d, d). Precomputed once."""
    d = phi.shape[-1]
    a = phi.transpose(1, 2) @ phi + lam * torch.eye(d, dtype=phi.dtype)
    return torch.linalg.cholesky(a)


def bonus(phi: torch.Tensor, chol: torch.Tensor, lam: float) -> torch.Tensor:
    """sqrt(lambda * phi^T A^{-1} phi) for phi (M, B, d) and chol = cholesky(A) (M, d, d) -> (M, B).

    Differentiable in phi: A^{-1} phi comes from a triangular solve, ||L^{-1} phi||^2 = phi^T A^{-1} phi.
    """
    v = torch.linalg.solve_triangular(chol, phi.transpose(1, 2), upper=False)  # (M, d, B)
    return torch.sqrt(lam * (v**2).sum(1) + 1e-12)


@dataclass
class RewardStats:
    """Everything besides the member weights that the conservative reward needs, fitted on D_off."""

    y_mean: float  # labels are standardised for training; r_hat is reported on the label scale
    y_std: float
    bonus_lambda: float
    lcb_scale: float  # std(r_hat) / std(std_m r_hat_m) over D_off
    bonus_scale: float  # std(r_hat) / std(g_bonus) over D_off


class ConservativeReward(nn.Module):
    """x -> (r_hat, g_hat), both (B,) on the label scale and differentiable in x.

    x is what the members read: (soft) one-hot sequences (B, L, 4) for CNN members, vectors (B, D) (e.g.
    CLIP image embeddings) for MLP members.
    """

    def __init__(self, net: StackedNet | StackedMLP, stats: RewardStats, whiten_mean: torch.Tensor,
                 whiten: torch.Tensor, chol: torch.Tensor, penalty: str = "min", strength: float = 1.0):
        super().__init__()
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}; valid: {list(PENALTIES)}")
        self.net, self.stats, self.penalty, self.strength = net.eval(), stats, penalty, float(strength)
        self.register_buffer("whiten_mean", whiten_mean)  # (M, d)
        self.register_buffer("whiten", whiten)  # (M, d, d)
        self.register_buffer("chol", chol)  # (M, d, d)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def members(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member rewards (M, B) on the label scale, and whitened features (M, B, d)."""
        phi = self.net.features(x)
        r = self.net.head(phi) * self.stats.y_std + self.stats.y_mean
        return r, (phi - self.whiten_mean[:, None, :]) @ self.whiten

    def forward(self, x: torch.Tensor, penalty: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        penalty = penalty or self.penalty
        r, phi = self.members(x)
        r_hat = r.mean(0)
        if penalty == "none":
            g_hat = torch.zeros_like(r_hat)
        elif penalty == "min":
            g_hat = r_hat - r.min(0).values  # so that r_hat - g_hat = min_m r_m
        elif penalty == "lcb":
            g_hat = self.strength * self.stats.lcb_scale * r.std(0)
        else:
            g_hat = self.strength * self.stats.bonus_scale * bonus(phi, self.chol, self.stats.bonus_lambda).mean(0)
        return r_hat, g_hat

    def with_penalty(self, penalty: str, strength: float | None = None) -> ConservativeReward:
        """The same members and statistics under another penalty mode (shares tensors, no copy)."""
        return ConservativeReward(self.net, self.stats, self.whiten_mean, self.whiten, self.chol, penalty,
                                  self.strength if strength is None else strength)

    # ---- checkpoint: one safetensors file holding every member, the statistics and the spec as metadata
    def to_bytes(self, extra: dict | None = None) -> bytes:
        tensors = {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}
        tensors.update(whiten_mean=self.whiten_mean.contiguous(), whiten=self.whiten.contiguous(),
                       chol=self.chol.contiguous())
        meta = {"kind": spec_kind(self.net.spec), "spec": json.dumps(asdict(self.net.spec)), "members": json.dumps(self.net.members),
                "stats": json.dumps(asdict(self.stats)), "extra": json.dumps(extra or {})}
        return save_safetensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, penalty: str = "min", strength: float = 1.0) -> ConservativeReward:
        tensors = load_safetensors(data)
        meta = _metadata(data)
        spec_cls, stack_cls = STACKS[meta.get("kind", "cnn")]  # checkpoints before MLP members held CNNs
        net = stack_cls(spec_cls(**json.loads(meta["spec"])), json.loads(meta["members"]), seed=0)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        return cls(net, RewardStats(**json.loads(meta["stats"])), tensors["whiten_mean"], tensors["whiten"],
                   tensors["chol"], penalty, strength)


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def checkpoint_extra(data: bytes) -> dict:
    """The ``extra`` dict (training metrics, config) stored with a reward checkpoint."""
    return json.loads(_metadata(data).get("extra", "{}"))

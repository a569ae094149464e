"""Training bootstrap members of the reward ensemble as one stacked computation.

Member m's bootstrap resample, batch order and initial weights are drawn from generators seeded by
(seed, m), its loss touches only its own parameter slice, and Adam is elementwise: so member m ends with
the same weights whether it is trained alone, beside the other members, or on any Ray worker.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from braid_ray.data.encoding import one_hot
from braid_ray.reward.stacked import MLPSpec, StackedNet, StackSpec, build_stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 30  # maximum passes over each member's resample
    batch_size: int = 256  # rows per member per step
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    patience: int = 4  # epochs without out-of-bag improvement before a member stops


def member_inputs(spec: StackSpec | MLPSpec, x: np.ndarray) -> torch.Tensor:
    """What the members read: one-hot (N, L, 4) from codes (N, L) for CNN members, float32 (N, D) for MLP members."""
    if isinstance(spec, MLPSpec):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.from_numpy(one_hot(x))


def bootstrap(n: int, seed: int, member: int) -> tuple[np.ndarray, np.ndarray]:
    """Member ``member``'s with-replacement resample of n rows, and its out-of-bag rows."""
    rng = np.random.default_rng([seed, member, 0])
    idx = rng.integers(0, n, n)
    oob = np.setdiff1d(np.arange(n), idx)
    return idx, oob


def _oob_mse(net: StackedNet, x_all: torch.Tensor, z_all: torch.Tensor, pad: np.ndarray, mask: np.ndarray,
             chunk: int = 2048) -> list[float]:
    """Each member's MSE on its own out-of-bag rows, all members in one stacked pass per chunk (on x_all's device)."""
    net.eval()
    device = x_all.device
    total = torch.zeros(pad.shape[0], dtype=torch.float64, device=device)
    with torch.no_grad():
        for j in range(0, pad.shape[1], chunk):
            idx = torch.from_numpy(pad[:, j:j + chunk]).to(device)
            err = (net(x_all[idx]) - z_all[idx]) ** 2
            total += (err * torch.from_numpy(mask[:, j:j + chunk]).to(device)).sum(1).double()
    return (total.cpu() / torch.from_numpy(mask.sum(1))).tolist()


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def train_members(codes: np.ndarray, z: np.ndarray, members: list[int], spec: StackSpec | MLPSpec,
                  train: TrainSpec, seed: int, progress: bool = True,
                  device: torch.device | None = None) -> tuple[StackedNet, list[dict]]:
    """Train ``members`` on standardised labels z of ``codes`` (N, L), or of vectors (N, D) for an MLPSpec;
    each member stops on its own out-of-bag rows. The rows and the stack live on ``device`` (default: the CPU);
    resamples and batch orders are drawn on the CPU, so the members do not depend on the device.

    Returns the stacked net (on the CPU) holding each member's best (lowest out-of-bag MSE) weights, and
    per-member metrics.
    """
    n = len(codes)
    device = device or torch.device("cpu")
    x_all = member_inputs(spec, codes).to(device)
    z_all = torch.from_numpy(np.asarray(z, dtype=np.float32)).to(device)
    net = build_stack(spec, members, seed).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    samples = [bootstrap(n, seed, m) for m in members]
    rngs = [np.random.default_rng([seed, m, 1]) for m in members]
    m_count = len(members)
    best = [math.inf] * m_count
    best_epoch = [0] * m_count
    active = [True] * m_count
    best_state = [_cpu(net.member_state(i)) for i in range(m_count)]
    stopped = [train.epochs] * m_count
    width = max(oob.size for _, oob in samples)
    oob_pad = np.zeros((m_count, width), dtype=np.int64)
    oob_mask = np.zeros((m_count, width), dtype=bool)
    for i, (_, oob) in enumerate(samples):
        oob_pad[i, :oob.size], oob_mask[i, :oob.size] = oob, True
    steps = math.ceil(n / train.batch_size)
    epoch = 0
    for epoch in range(1, train.epochs + 1):
        net.train()
        orders = [rng.permutation(idx) for rng, (idx, _) in zip(rngs, samples)]
        for s in range(steps):
            batch = torch.from_numpy(np.stack([o[s * train.batch_size:(s + 1) * train.batch_size] for o in orders]))
            batch = batch.to(device)
            pred = net(x_all[batch])  # (M, B)
            loss = ((pred - z_all[batch]) ** 2).mean(dim=1).sum()  # sum of per-member means: no coupling
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mse = _oob_mse(net, x_all, z_all, oob_pad, oob_mask)
        for i in range(m_count):
            if not active[i]:
                continue
            if mse[i] < best[i]:
                best[i], best_epoch[i], best_state[i] = mse[i], epoch, _cpu(net.member_state(i))
            elif epoch - best_epoch[i] >= train.patience:
                active[i], stopped[i] = False, epoch  # frozen at its best: later epochs never change it
        if progress:
            log.info("reward members %s: epoch %d/%d, out-of-bag RMSE %s", members, epoch, train.epochs,
                     " ".join(f"{math.sqrt(b):.3f}" for b in best))
        if not any(active):
            break
    final = type(net).from_members(spec, members, best_state)
    metrics = [{"member": m, "oob_rmse_std_units": math.sqrt(best[i]), "best_epoch": best_epoch[i],
                "oob_rows": int(samples[i][1].size), "epochs_run": stopped[i], "device": str(device)}
               for i, m in enumerate(members)]
    return final.eval(), metrics

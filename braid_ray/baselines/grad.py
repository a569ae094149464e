"""Gradient ascent on the reward model's input (design-bench's ``Grad.``): the reference a fine-tuned
diffusion model should be measured against.

Start from the best designs of D_off, relax each to logits over the alphabet, and follow the gradient of the
ensemble-mean reward r_hat on softmax(logits). A mild entropy term keeps the relaxed designs near one-hot
vertices, where the reward model was trained, so the argmax that is scored is the design that was optimised.
It uses only D_off and the reward model: no diffusion model, no oracle.
"""

from __future__ import annotations

import numpy as np
import torch

from braid_ray.data.encoding import one_hot
from braid_ray.reward.conservative import ConservativeReward


def gradient_ascent(reward: ConservativeReward, start: np.ndarray, steps: int = 100, lr: float = 0.1,
                    entropy_weight: float = 0.1, init_logit: float = 2.0, batch_size: int = 1024) -> np.ndarray:
    """Optimise ``start`` codes (n, L) by Adam on logits; returns the argmax codes (n, L).

    The objective per design is ``r_hat(p) / std(y) - entropy_weight * H(p)``, with p = softmax(logits) and
    H the mean per-position entropy (nats); logits start at ``init_logit`` on the starting letter, 0 elsewhere.
    """
    out = []
    for i in range(0, len(start), batch_size):
        chunk = torch.from_numpy(one_hot(start[i:i + batch_size])).float()
        logits = (chunk * init_logit).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=lr)
        for _ in range(steps):
            p = torch.softmax(logits, -1)
            r_hat, _ = reward(p, penalty="none")
            entropy = -(p * torch.log(p + 1e-9)).sum(-1).mean(-1)
            loss = -(r_hat / reward.stats.y_std - entropy_weight * entropy).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(logits.detach().argmax(-1).numpy().astype(np.int8))
    return np.concatenate(out) if out else np.zeros((0, start.shape[1]), dtype=np.int8)

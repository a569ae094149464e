"""Evaluation of image methods: a sample grid per method, oracle score distributions, r_hat-vs-oracle curves.

Every method samples from the same prompts and seeds, so the methods are compared image for image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from braid_ray.images.aesthetic import ImageReward, to_uint8
from braid_ray.images.prompts import prompt_set
from braid_ray.images.sampler import ImagePolicy, image_rollout
from braid_ray.methods import label


@torch.inference_mode()
def sample_and_score(policy: ImagePolicy, reward: ImageReward, prompts: list[str], seed: int, batch: int
                     ) -> tuple[np.ndarray, pd.DataFrame]:
    """Images (N, H, W, 3) uint8 for ``prompts`` and a frame of their oracle score, r_hat and g_hat.

    The noise comes from CPU generators seeded by ``seed``: the same for every method, on any device."""
    pixels, rows = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        g = torch.Generator().manual_seed(seed + start)  # the same noise for every method
        roll = image_rollout(policy, chunk, 1, g, use_checkpoint=False, with_kl=False)
        images = policy.decode(roll.x0)
        emb = reward.embedder(images)
        r_hat, g_hat = reward.reward(emb)
        oracle = reward.oracle_head(emb)
        pixels.append(to_uint8(images))
        rows += [{"prompt": p, "oracle": float(o), "r_hat": float(r), "g_hat": float(gh)}
                 for p, o, r, gh in zip(chunk, oracle, r_hat, g_hat)]
    return np.concatenate(pixels), pd.DataFrame(rows)


def eval_prompts(name: str, n: int) -> list[str]:
    prompts = prompt_set(name)
    return [prompts[i % len(prompts)] for i in range(n)]


def sample_grid(pixels: np.ndarray, scores: np.ndarray, title: str, path: str | Path) -> Path:
    """A PNG grid of images (N, H, W, 3) uint8, each titled with its oracle score."""
    n = len(pixels)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.6 * cols, 1.7 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, s in zip(axes.flat, pixels, scores):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"{s:.2f}", fontsize=8)
    fig.suptitle(f"{title}: oracle mean {np.mean(scores):.3f}", fontsize=10)
    return _save(fig, path)


def reward_vs_oracle(histories: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """r_hat and the oracle's score of the training images over fine-tuning steps, one panel per method.

    Over-optimisation shows as r_hat rising while the oracle stalls or falls; a conservative reward should
    keep the two together.
    """
    if not histories:
        raise ValueError("histories: expected at least one method's training history")
    fig = Figure(figsize=(4.2 * len(histories), 3.4))
    axes = fig.subplots(1, len(histories), squeeze=False)
    for ax, (method, h) in zip(axes[0], histories.items()):
        ax.plot(h["step"], h["r_hat"], label="r_hat (learned reward)", color="tab:blue")
        ax.plot(h["step"], h["r_hat"] - h["g_hat"], label="r_hat - g_hat", color="tab:blue", linestyle="--")
        ax.plot(h["step"], h["oracle"], label="oracle (LAION)", color="tab:red")
        ax.set_title(label(method))
        ax.set_xlabel("fine-tuning step")
    axes[0][0].set_ylabel("aesthetic score")
    axes[0][-1].legend(fontsize=8, loc="best")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def summary_table(samples: pd.DataFrame, best_offline: float) -> pd.DataFrame:
    """Per method: images, oracle median / mean / 90th percentile / max, share above the best offline image,
    mean r_hat and g_hat."""
    rows = []
    for method, s in samples.groupby("method", sort=False):
        o = s["oracle"].to_numpy()
        rows.append({"method": label(method), "images": len(o), "oracle_median": float(np.median(o)),
                     "oracle_mean": float(o.mean()), "oracle_p90": float(np.quantile(o, 0.9)),
                     "oracle_max": float(o.max()), "above_best_offline": float((o > best_offline).mean()),
                     "r_hat": float(s["r_hat"].mean()), "g_hat": float(s["g_hat"].mean())})
    return pd.DataFrame(rows)

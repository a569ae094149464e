"""Evaluation figures: oracle score distributions per method (the paper's Fig. 2) and training curves.

Headless by design: figures are drawn with matplotlib's object API (``Figure``), which needs no GUI backend
and leaves pyplot's global state (current figure, backend) alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from braid_ray.eval.metrics import check_scores

DPI = 120
MAX_POINTS = 400  # scores drawn as dots per method; the box always summarises all of them


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def score_distributions(scores_by_method: dict[str, np.ndarray], best_offline: float, path: str | Path,
                        title: str, ylabel: str = "oracle score") -> Path:
    """Box plot of oracle scores (N_m,) per method, in the dict's order, over a strip of the scores, with a
    dashed line at the best offline design's score. Saves a PNG at ``path`` and returns it.

    Boxes span the quartiles with the median in black; whiskers reach 1.5 IQR; the dots are up to
    ``MAX_POINTS`` scores per method, so outliers stay visible.

    Boxes, not violins: a method that collapsed onto one sequence has constant scores, which a kernel
    density cannot draw.
    """
    if not scores_by_method:
        raise ValueError("scores_by_method: expected at least one method, got none")
    if not np.isfinite(best_offline):
        raise ValueError(f"best_offline: expected a finite score, got {best_offline!r}")
    names = list(scores_by_method)
    data = [check_scores(scores_by_method[m], f"scores_by_method[{m!r}]") for m in names]
    palette = colormaps["tab10"].colors
    colors = [palette[i % len(palette)] for i in range(len(names))]
    rng = np.random.default_rng(0)  # jitter and the subsample of dots only

    fig = Figure(figsize=(max(5.0, 1.4 * len(names) + 1.0), 4.5))
    ax = fig.subplots()
    positions = np.arange(1, len(names) + 1)
    for pos, scores, color in zip(positions, data, colors):
        shown = scores if scores.size <= MAX_POINTS else rng.choice(scores, MAX_POINTS, replace=False)
        ax.scatter(pos + rng.uniform(-0.18, 0.18, shown.size), shown, s=6, color=color, alpha=0.35,
                   linewidths=0, zorder=1)
    box = ax.boxplot(data, positions=positions, widths=0.55, showfliers=False, patch_artist=True,
                     medianprops={"color": "black", "linewidth": 1.6}, zorder=2)
    for patch, color in zip(box["boxes"], colors):
        patch.set_facecolor(to_rgba(color, 0.35))
        patch.set_edgecolor(color)
    ax.axhline(best_offline, color="crimson", linestyle="--", linewidth=1.3, zorder=3,
               label=f"best offline design ({best_offline:.3g})")
    crowded = len(names) > 8
    ax.set_xticks(positions, [f"{m}\n(n={s.size})" for m, s in zip(names, data)],
                  rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", frameon=False)
    return _save(fig, path)


def training_curves(curves: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Per fine-tuned method, the model's reward r_hat and the oracle r against ``step``: the
    over-optimisation picture (r_hat keeps rising while r stalls or falls). One subplot per method, shared y.

    Each frame needs ``step`` and ``r_hat``; ``g_hat`` adds the optimised r_hat - g_hat (when not all
    zero) and ``oracle`` (NaN at steps without oracle queries) adds r. Saves a PNG and returns the path.
    """
    if not curves:
        raise ValueError("curves: expected at least one method, got none")
    for method, frame in curves.items():
        missing = [c for c in ("step", "r_hat") if c not in frame.columns]
        if missing:
            raise ValueError(f"curves[{method!r}]: missing column(s) {missing}; have {list(frame.columns)}")
        if frame.empty:
            raise ValueError(f"curves[{method!r}]: no rows")
    n = len(curves)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    for ax, (method, frame) in zip(axes.flat, curves.items()):
        frame = frame.sort_values("step")
        ax.plot(frame["step"], frame["r_hat"], color="tab:blue", label="r_hat (model)")
        if "g_hat" in frame.columns and frame["g_hat"].abs().max() > 0:
            ax.plot(frame["step"], frame["r_hat"] - frame["g_hat"], color="tab:blue", linestyle=":",
                    label="r_hat - g_hat (optimised)")
        if "oracle" in frame.columns:
            queried = frame[np.isfinite(frame["oracle"].to_numpy(dtype=float))]
            if not queried.empty:
                ax.plot(queried["step"], queried["oracle"], color="tab:orange", marker="o", markersize=3,
                        label="r (oracle)")
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("reward")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    handles = {h.get_label(): h for ax in axes.flat[:n] for h in ax.get_lines()}
    order = ["r_hat (model)", "r_hat - g_hat (optimised)", "r (oracle)"]
    handles = {label: handles[label] for label in order if label in handles}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)

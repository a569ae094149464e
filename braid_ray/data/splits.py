"""The paper's offline protocol (section 7.1): D -> D_ora | D_0, and D_off = rows of D_0 below a quantile of y."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braid_ray.data.tables import Labelled


@dataclass
class Splits:
    """Row indices into D for each split, plus the quantile threshold that defines D_off."""

    ora: np.ndarray  # D_ora: held out for the oracle (may be empty where an exact/pretrained oracle exists)
    zero: np.ndarray  # D_0 = D \\ D_ora
    off: np.ndarray  # D_off: rows of D_0 with y < threshold; the only labels the method ever sees
    threshold: float  # the q-quantile of y over D_0
    quantile: float
    oracle_fraction: float


def below_quantile(y: np.ndarray, quantile: float, source: str, rows: str = "D") -> tuple[np.ndarray, float]:
    """The offline rule of both domains: the rows strictly below the ``quantile`` of y (so no row at the
    threshold, often tied on discrete scores, leaks in), as a mask, and the threshold."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    threshold = float(np.quantile(y, quantile))
    below = y < threshold
    if not below.any():
        raise ValueError(f"{source}: no row of {rows} lies below the {quantile} quantile ({threshold:.4g}); "
                         "the labels are too coarse for this quantile, choose a higher data.quantile")
    return below, threshold


def offline_splits(d: Labelled, oracle_fraction: float, quantile: float, seed: int) -> Splits:
    """Seeded random D_ora / D_0 split, then D_off = {i in D_0 : y_i < quantile_q(y over D_0)}."""
    if not 0.0 <= oracle_fraction < 1.0:
        raise ValueError(f"oracle_fraction must be in [0, 1), got {oracle_fraction}")
    n = len(d)
    perm = np.random.default_rng(seed).permutation(n)
    n_ora = int(round(oracle_fraction * n))
    ora, zero = np.sort(perm[:n_ora]), np.sort(perm[n_ora:])
    if zero.size == 0:
        raise ValueError(f"{d.source}: D_0 is empty with oracle_fraction={oracle_fraction} on {n} rows")
    below, threshold = below_quantile(d.y[zero], quantile, d.source, "D_0")
    off = zero[below]
    return Splits(ora, zero, off, threshold, quantile, oracle_fraction)


def summarize(d: Labelled, s: Splits) -> dict:
    """Row counts, the threshold, the best offline design and its percentile in the full data."""
    best = int(s.off[np.argmax(d.y[s.off])])
    return {
        "rows": {"D": len(d), "D_ora": int(s.ora.size), "D_0": int(s.zero.size), "D_off": int(s.off.size)},
        "quantile": s.quantile,
        "oracle_fraction": s.oracle_fraction,
        "threshold": s.threshold,
        "best_offline_y": float(d.y[best]),
        "best_offline_row": best,
        "best_offline_percentile": float(100.0 * np.mean(d.y <= d.y[best])),
        "y_full": {"min": float(d.y.min()), "median": float(np.median(d.y)), "max": float(d.y.max())},
        "y_off": {"min": float(d.y[s.off].min()), "median": float(np.median(d.y[s.off])),
                  "max": float(d.y[s.off].max())},
    }

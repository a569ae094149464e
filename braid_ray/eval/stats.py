"""Statistics shared by the oracles, the reward calibration, the metrics and the benchmarks: Pearson's r,
Spearman's rho and a percentile-bootstrap interval of a mean.

NumPy only. Each returns NaN where its value is undefined (a constant input, a NaN in either input, fewer
than ``min_rows`` pairs) rather than raising, since callers tabulate it beside other numbers.
"""

from __future__ import annotations

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a correlation needs paired values: got {a.size} and {b.size}")
    return a, b


def _undefined(a: np.ndarray, b: np.ndarray, min_rows: int) -> bool:
    # exact equality, not std() == 0: the std of a constant float vector can be a round-off above zero
    return (a.size < max(min_rows, 2) or bool(np.isnan(a).any() or np.isnan(b).any())
            or a.min() == a.max() or b.min() == b.max())


def pearson(a: np.ndarray, b: np.ndarray, min_rows: int = 2) -> float:
    """Pearson's r of the pairs (a_i, b_i), a and b (N,); NaN if undefined (see the module docstring)."""
    a, b = _pair(a, b)
    if _undefined(a, b, min_rows):
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..N of a (N,), ties sharing their average rank (scipy.stats.rankdata's default); NaN stays NaN."""
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="stable")  # NaNs sort last
    ordered = a[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # each NaN is a group of its own
    ends = np.r_[starts[1:], a.size]
    group = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(a.size)
    ranks[order] = ((starts + 1 + ends) / 2)[group]  # the mean of ranks start + 1 .. end
    ranks[np.isnan(a)] = np.nan
    return ranks


def spearman(a: np.ndarray, b: np.ndarray, min_rows: int = 2) -> float:
    """Spearman's rho of a and b (N,): Pearson's r of their average ranks; NaN if undefined."""
    a, b = _pair(a, b)
    return pearson(rankdata(a), rankdata(b), min_rows)


def bootstrap_ci(values: np.ndarray, n_boot: int = 10_000, level: float = 0.95, seed: int = 0,
                 min_values: int = 1) -> tuple[float, float]:
    """Percentile-bootstrap ``level`` interval (lo, hi) of the mean of ``values`` (N,), from ``n_boot`` resamples
    with replacement; (NaN, NaN) with fewer than ``min_values`` values (one value gives the interval [v, v])."""
    v = np.asarray(values, np.float64).ravel()
    if v.size < max(min_values, 1):
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, size=(n_boot, v.size), replace=True).mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

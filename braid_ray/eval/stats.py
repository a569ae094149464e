"""Statistics shared by the oracles, the reward calibration, the metrics and the benchmarks: Pearson's r,
Spearman's rho, and two intervals of a mean: the percentile bootstrap and Student's t. Over a handful of seeds the
bootstrap interval is no wider than the values' range (three values: it is their range), so a paired difference
over 3-5 seeds is reported with the t interval beside it.

NumPy only. Each returns NaN where its value is undefined (a constant input, a NaN in either input, fewer
than ``min_rows`` pairs) rather than raising, since callers tabulate it beside other numbers.
"""

from __future__ import annotations

import math

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


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3-4: a finite sum in cos(theta), theta = atan(t / sqrt(df)))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    cos = math.cos(theta)  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * cos * total)


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level`` for ``df`` degrees of freedom (bisection on ``t_two_sided``)."""
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student's t ``level`` interval (lo, hi) of the mean of ``values`` (N,): mean -/+ t * sd / sqrt(N), with N - 1
    degrees of freedom; (NaN, NaN) with fewer than two values."""
    v = np.asarray(values, np.float64).ravel()
    if v.size < 2:
        return float("nan"), float("nan")
    half = t_quantile(level, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)

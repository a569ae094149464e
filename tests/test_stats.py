"""Pearson's r, Spearman's rho, the bootstrap interval and Student's t against closed forms, numerical integration
and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from braid_ray.eval.stats import bootstrap_ci, pearson, rankdata, spearman, t_interval, t_quantile, t_two_sided


def _pearson_by_definition(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_pearson_matches_the_definition_and_is_one_on_affine_maps() -> None:
    a, b = [1.0, 2.0, 4.0, 7.0, 3.0], [2.0, 1.0, 5.0, 8.0, 2.5]
    assert pearson(a, b) == pytest.approx(_pearson_by_definition(a, b), abs=1e-12)
    # by hand: deviations (-1, 0, 1) and (-4/3, -1/3, 5/3); sum of products 3, sums of squares 2 and 14/3
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 14 / 3), abs=1e-12)
    x = np.linspace(-1, 2, 11)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0) and pearson(x, -x) == pytest.approx(-1.0)


def test_rankdata_averages_ties_and_keeps_nan() -> None:
    np.testing.assert_array_equal(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    np.testing.assert_array_equal(rankdata([3, 3, 3]), [2, 2, 2])
    np.testing.assert_array_equal(rankdata([0.5, -1, 0.5, 0.5, 7]), [3, 1, 3, 3, 5])
    np.testing.assert_array_equal(rankdata([2.0, np.nan, 1.0]), [2, np.nan, 1])
    assert rankdata([]).shape == (0,)


def test_spearman_closed_form_without_ties_and_by_hand_with_ties() -> None:
    # no ties: rho = 1 - 6 sum(d^2) / (n (n^2 - 1)); ranks of b are (2, 1, 4, 5, 3): d = (-1, 1, -1, -1, 2)
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [20.0, 10.0, 40.0, 50.0, 30.0]
    assert spearman(a, b) == pytest.approx(1 - 6 * 8 / (5 * 24))
    # ties: Pearson of the average ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
        _pearson_by_definition([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0) and pearson(x, x ** 3) < 0.99


def test_undefined_cases_are_nan() -> None:
    x = [1.0, 2.0, 3.0]
    for f in (pearson, spearman):
        assert math.isnan(f(x, [0.1, 0.1, 0.1]))  # constant (np.std of it is a round-off above 0)
        assert math.isnan(f([5.0, 5.0, 5.0], x))
        assert math.isnan(f([1.0, np.nan, 3.0], x))
        assert math.isnan(f([1.0], [2.0])) and math.isnan(f([], []))
        assert math.isnan(f([1.0, 2.0], [1.0, 3.0], min_rows=3)) and f([1.0, 2.0], [1.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="paired values: got 3 and 2"):
        pearson(x, [1.0, 2.0])


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible() -> None:
    v = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    lo, hi = bootstrap_ci(v, n_boot=2000, seed=1)
    assert v.min() <= lo < v.mean() < hi <= v.max()
    assert bootstrap_ci(v, n_boot=2000, seed=1) == (lo, hi)
    assert bootstrap_ci(np.full(4, 2.5)) == (2.5, 2.5) and bootstrap_ci([3.0]) == (3.0, 3.0)
    assert all(math.isnan(x) for x in (*bootstrap_ci([]), *bootstrap_ci([3.0], min_values=2)))
    wide, narrow = bootstrap_ci(v, level=0.99), bootstrap_ci(v, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def _t_mass_by_integration(t: float, df: int) -> float:
    """P(|T| <= t) by the trapezoid rule on Student's density (an independent route to the closed form)."""
    x = np.linspace(0.0, t, 200_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    return float(2 * np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9, 30])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 7.0])
def test_t_mass_is_the_integral_of_the_density(df: int, t: float) -> None:
    assert t_two_sided(t, df) == pytest.approx(_t_mass_by_integration(t, df), abs=1e-8)


def test_t_quantiles_are_the_textbook_ones() -> None:
    # two-sided 95% critical values (any t table): 12.706, 4.303, 3.182, 2.776, 2.571, 2.262, 2.042
    for df, t in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.95, df) == pytest.approx(t, abs=5e-4)
    assert t_quantile(0.99, 4) == pytest.approx(4.604, abs=5e-4)
    with pytest.raises(ValueError, match="positive integer"):
        t_two_sided(1.0, 0)


def test_t_interval_is_wider_than_the_bootstrap_over_a_few_seeds() -> None:
    d = np.array([0.434, 0.382, 0.323])  # three paired differences
    lo, hi = t_interval(d)
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-3)
    b_lo, b_hi = bootstrap_ci(d)
    assert lo < b_lo and hi > b_hi and d.min() <= b_lo and b_hi <= d.max()  # the bootstrap never leaves the range
    assert all(math.isnan(x) for x in t_interval([1.0]))

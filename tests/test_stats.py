"""Pearson's r, Spearman's rho and the bootstrap interval against closed forms and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from braid_ray.eval.stats import bootstrap_ci, pearson, rankdata, spearman


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

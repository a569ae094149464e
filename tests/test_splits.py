"""The paper's offline protocol (section 7.1)."""

from __future__ import annotations

import numpy as np
import pytest

from braid_ray.data.splits import offline_splits, summarize
from braid_ray.data.tables import Labelled


def _data(n: int = 5000, seed: int = 0) -> Labelled:
    rng = np.random.default_rng(seed)
    return Labelled(rng.integers(0, 4, (n, 10)).astype(np.int8), rng.normal(size=n).round(2), "synthetic")


@pytest.mark.parametrize("fraction, q", [(0.0, 0.5), (0.5, 0.6), (0.3, 0.95)])
def test_quantile_property(fraction: float, q: float) -> None:
    d = _data()
    s = offline_splits(d, fraction, q, seed=1)
    assert np.intersect1d(s.ora, s.zero).size == 0 and s.ora.size + s.zero.size == len(d)
    assert s.ora.size == round(fraction * len(d))
    assert np.isin(s.off, s.zero).all()
    assert s.threshold == pytest.approx(np.quantile(d.y[s.zero], q))
    above = np.setdiff1d(s.zero, s.off)
    assert (d.y[s.off] < s.threshold).all() and (d.y[above] >= s.threshold).all()
    assert abs(s.off.size / s.zero.size - q) < 0.02  # ties at 2 decimals cost at most a little


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    d = _data()
    a, b, c = (offline_splits(d, 0.5, 0.6, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.ora, b.ora)
    np.testing.assert_array_equal(a.off, b.off)
    assert not np.array_equal(a.ora, c.ora)


def test_summary_reports_best_offline_design_and_its_percentile() -> None:
    d = _data()
    s = offline_splits(d, 0.5, 0.6, seed=0)
    summary = summarize(d, s)
    assert summary["rows"] == {"D": 5000, "D_ora": 2500, "D_0": 2500, "D_off": s.off.size}
    assert summary["best_offline_y"] == d.y[s.off].max() < s.threshold
    assert summary["best_offline_percentile"] == pytest.approx(100 * np.mean(d.y <= d.y[s.off].max()))


def test_degenerate_quantile_is_a_clear_error() -> None:
    flat = Labelled(np.zeros((10, 4), np.int8), np.zeros(10), "flat.csv")
    with pytest.raises(ValueError, match="flat.csv: every label of D_0 is 0: there is nothing to rank"):
        offline_splits(flat, 0.0, 0.5, 0)
    ties = Labelled(np.zeros((10, 4), np.int8), np.r_[np.ones(9), 2.0], "ties.csv")  # the median is the lowest y
    with pytest.raises(ValueError, match="ties.csv: no row of D_0 lies below the 0.5 quantile"):
        offline_splits(ties, 0.0, 0.5, 0)

"""The paper's offline protocol (section 7.1)."""

from __future__ import annotations

import numpy as np
import pytest

from braid_ray.data.splits import check_offline, offline_splits, summarize
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


def test_scan_is_the_hamming_ball_of_d0_around_a_wild_type_at_the_quantile() -> None:
    d = _data(n=20_000)
    s = offline_splits(d, 0.3, 0.7, seed=2, scan_radius=3)
    assert s.scan_radius == 3 and np.isin(s.wild_type, s.zero)
    distance = (d.codes != d.codes[s.wild_type]).sum(axis=1)
    np.testing.assert_array_equal(s.off, np.intersect1d(s.zero, np.flatnonzero(distance <= 3)))  # all of D_0's ball
    assert s.threshold == d.y[s.wild_type]
    assert abs(np.mean(d.y[s.zero] < d.y[s.wild_type]) - 0.7) < 0.01  # drawn at the quantile of D_0's y
    again, wider, other = (offline_splits(d, 0.3, 0.7, seed, scan_radius=r) for seed, r in ((2, 3), (2, 4), (3, 3)))
    np.testing.assert_array_equal(again.off, s.off)
    assert wider.wild_type == s.wild_type and np.isin(s.off, wider.off).all()  # the same wild type at every radius
    assert other.wild_type != s.wild_type
    summary = summarize(d, s)
    assert summary["scan_radius"] == 3 and summary["wild_type_row"] == s.wild_type
    assert "Hamming distance 3" in summary["offline_rule"] and summary["rows"]["D_off"] == s.off.size


def test_scan_around_a_given_wild_type_and_its_errors() -> None:
    d = _data(n=2000)
    s = offline_splits(d, 0.5, 0.5, seed=0, scan_radius=9)
    row = int(s.zero[5])
    given = offline_splits(d, 0.5, 0.5, seed=0, scan_radius=9, wild_type=d.codes[row])
    assert given.wild_type == row and np.isin(given.off, given.zero).all()
    with pytest.raises(ValueError, match="synthetic: data.wild_type is in D_ora"):
        offline_splits(d, 0.5, 0.5, seed=0, scan_radius=2, wild_type=d.codes[s.ora[0]])
    with pytest.raises(ValueError, match="data.wild_type has 3 letters, the sequences 10"):
        offline_splits(d, 0.5, 0.5, seed=0, scan_radius=2, wild_type=np.zeros(3, np.int8))
    tiny = offline_splits(d, 0.0, 0.5, seed=0, scan_radius=1)  # about 1 + 30 / 1024 * 2000 rows: too few
    with pytest.raises(ValueError, match="D_off has .* within Hamming distance 1 .* raise data.scan_radius"):
        check_offline(d, tiny, trained_oracle=False)


def test_the_data_stage_writes_the_scan_and_keeps_the_quantile_record(tmp_path) -> None:
    from pathlib import Path

    from braid_ray.config import load_config
    from braid_ray.rundir import RunDir
    from braid_ray.stages import _resolved_data, data_stage

    preset = Path(__file__).resolve().parents[1] / "configs" / "tfbind8.yaml"
    cfg = load_config(preset, [f"run.dir={tmp_path}", "data.scan_radius=2", "data.wild_type=TGATACCT"])
    data = data_stage(cfg, RunDir(cfg.run.dir))
    wild = data.d.codes[data.splits.wild_type]
    assert "".join("ACGT"[c] for c in wild) == "TGATACCT" and data.splits.off.size == 1 + 24 + 252
    assert np.all((data.d.codes[data.splits.off] != wild).sum(axis=1) <= 2)
    assert data.summary["offline_rule"].startswith("D_0 within Hamming distance 2 of the wild type")
    assert data.summary["wild_type"] == "TGATACCT"
    again = data_stage(cfg, RunDir(cfg.run.dir))  # reused from the stage, with the same scan
    np.testing.assert_array_equal(again.splits.off, data.splits.off)
    assert again.splits.wild_type == data.splits.wild_type and again.splits.rule == data.splits.rule
    plain = load_config(preset, [f"run.dir={tmp_path}"])  # run directories made before scans existed are reused
    assert set(_resolved_data(plain, data.task)) == {"quantile", "oracle_fraction"}


def test_a_scan_with_d_ora_indexes_d_and_is_reused_lowercase_or_not(tmp_path) -> None:
    import pandas as pd

    from braid_ray import pipeline
    from braid_ray.config import load_config
    from braid_ray.rundir import RunDir
    from braid_ray.stages import data_stage

    rng = np.random.default_rng(0)
    seqs = list(dict.fromkeys("".join(rng.choice(list("ACGT"), 7)) for _ in range(4000)))[:3000]  # distinct
    table = tmp_path / "t.csv"
    pd.DataFrame({"seq": seqs, "y": rng.normal(size=3000)}).to_csv(table, index=False)
    base = ["task.name=csv", f"task.path={table}", "task.sequence_column=seq", "task.label_column=y",
            f"run.dir={tmp_path / 'run'}", "data.oracle_fraction=0.3", "data.quantile=0.5", "data.scan_radius=3"]
    data = data_stage(load_config(None, base), RunDir(str(tmp_path / "run")))
    s, d = data.splits, data.d
    assert s.ora.size == 900 and np.isin(s.wild_type, s.zero) and not np.isin(s.off, s.ora).any()
    in_ball = (d.codes != d.codes[s.wild_type]).sum(axis=1) <= 3
    np.testing.assert_array_equal(s.off, np.intersect1d(s.zero, np.flatnonzero(in_ball)))  # rows of D, D_0's only
    assert abs(np.mean(d.y[s.zero] < d.y[s.wild_type]) - 0.5) <= 0.006  # at data.quantile of D_0's y
    wild = data.summary["wild_type"]
    lower = load_config(None, [*base, f"data.wild_type={wild.lower()}"])
    again = data_stage(lower, RunDir(str(tmp_path / "run2")))
    assert again.splits.wild_type == s.wild_type
    np.testing.assert_array_equal(again.splits.off, s.off)
    printed = pipeline.check(lower)
    assert f"D_off = D_0 within Hamming distance 3 of the wild type (row {s.wild_type}" in printed
    summary = pipeline.format_summary({"run_dir": "r", "data": again.summary})
    assert f"D_off       D_0 within Hamming distance 3 of the wild type (row {s.wild_type}" in summary
    assert summary.splitlines()[3].endswith(f": {wild}")
    with pytest.raises(ValueError, match="data.wild_type is in D_ora"):
        offline_splits(d, 0.3, 0.5, 0, scan_radius=3, wild_type=d.codes[s.ora[0]])
    with pytest.raises(ValueError, match="data.scan_radius=7 reaches every sequence of 7 letters"):
        offline_splits(d, 0.3, 0.5, 0, scan_radius=7)


def test_a_scan_of_constant_labels_names_the_scan_not_a_quantile() -> None:
    codes = np.random.default_rng(1).integers(0, 4, (400, 6)).astype(np.int8)
    y = np.r_[np.zeros(200), np.ones(200)]
    d = Labelled(codes, y, "scan.csv")
    s = offline_splits(d, 0.0, 0.25, 0, scan_radius=1)
    s.off = s.off[d.y[s.off] == d.y[s.off][0]]  # a library whose labels all agree
    s.off = np.resize(s.off, 25)
    with pytest.raises(ValueError, match=r"every D_off label is .*D_0 within Hamming distance 1 of the wild type"
                                         r".*raise data.scan_radius, choose another data.wild_type"):
        check_offline(d, s, trained_oracle=False)


def test_scan_is_the_hamming_ball_around_a_seeded_wild_type_at_the_quantile() -> None:
    import itertools
    from math import comb

    from braid_ray.data.splits import scan_rows

    codes = np.array(list(itertools.product(range(4), repeat=8)), dtype=np.int8)  # every 8-mer
    y = np.random.default_rng(0).random(len(codes))
    ball, wt = scan_rows(codes, y, 0.7, 2, seed=3)
    assert ball.size == sum(comb(8, k) * 3**k for k in range(3))  # 1 + 24 + 252
    assert wt in ball and np.all(np.diff(ball) > 0)
    assert np.all((codes[ball] != codes[wt]).sum(axis=1) <= 2)
    assert ((codes != codes[wt]).sum(axis=1) <= 2).sum() == ball.size  # every row of the ball, nothing else
    assert abs((y < y[wt]).mean() - 0.7) <= 0.0051  # drawn at the quantile
    assert scan_rows(codes, y, 0.7, 1, seed=3)[1] == wt  # the same wild type for every radius
    assert scan_rows(codes, y, 0.7, 2, seed=4)[1] != wt
    few = scan_rows(codes[:60], y[:60], 0.7, 2, seed=3)[1]  # too few rows within 0.005: the nearest rank
    assert abs((y[:60] < y[few]).mean() - 0.7) <= 1 / 59

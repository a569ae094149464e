"""The helpers of benchmarks/overoptimisation.py: settings, enumeration order, design metrics, paired CIs, resume."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("overoptimisation", ROOT / "benchmarks" / "overoptimisation.py")
oo = importlib.util.module_from_spec(_spec)
sys.modules["overoptimisation"] = oo  # dataclasses look their module up while the class is built
_spec.loader.exec_module(oo)


def test_parse_setting_and_names() -> None:
    s = oo.parse_setting("q0.5-n1000")
    assert (s.quantile, s.rows, s.table) == (0.5, 1000, "SIX6_REF_R1")
    assert s.name == "SIX6_REF_R1 q=0.5 n=1000" and s.short == "q0.5 n=1k"
    assert oo.parse_setting("q0.1").rows is None and oo.parse_setting("q.2").quantile == 0.2
    noisy = oo.parse_setting("q0.5-n1000-s0.5")
    assert (noisy.rows, noisy.noise, noisy.name, noisy.short) == (1000, 0.5, "SIX6_REF_R1 q=0.5 n=1000 s=0.5",
                                                                  "q0.5 n=1k s=0.5")
    assert oo.parse_setting("q0.2-s1").noise == 1.0 and oo.parse_setting("q0.2").noise == 0.0
    for bad in ("0.5", "q1.5", "q0.5-n5", "q0.5n100", "q0.5-s0", "q0.5-s-1", "q0.5-s0.5-n100"):
        with pytest.raises(ValueError, match="expected q"):
            oo.parse_setting(bad)
    assert oo.table_name("/data/PBX4_REF_R2_8mers.txt.gz") == "PBX4_REF_R2"
    scan = oo.parse_setting("wt0.7-r2-n100-s0.5")
    assert (scan.quantile, scan.radius, scan.rows, scan.noise) == (0.7, 2, 100, 0.5)
    assert scan.name == "SIX6_REF_R1 wt=0.7 r=2 n=100 s=0.5" and scan.short == "wt0.7 r2 n=100 s=0.5"
    assert oo.parse_setting("q0.5").radius is None
    for bad in ("wt0.7", "wt1.2-r2", "wt0.7-r0", "wt0.7-r8", "r2", "q0.5-r2"):
        with pytest.raises(ValueError, match="wt<wild type"):
            oo.parse_setting(bad)


def test_a_scan_setting_runs_through_the_products_data_options() -> None:
    cfg = oo.config(oo.parse_setting("wt0.7-r2"), 3, None)
    assert (cfg.data.scan_radius, cfg.data.quantile, cfg.run.seed) == (2, 0.7, 3)
    assert cfg.run.dir.endswith("SIX6_REF_R1-wt0.7-r2-seed3")
    plain = oo.config(oo.parse_setting("q0.2"), 3, None)
    assert plain.data.scan_radius is None and plain.data.quantile == 0.2


def test_setting_order_puts_scans_after_the_quantile_splits() -> None:
    df = pd.DataFrame({"setting": ["scan", "q"], "table": ["T"] * 2, "quantile": [0.1, 0.5],
                       "rows": [None, None], "noise": [0.0, 0.0], "radius": [2, None]})
    assert oo.setting_order(df) == ["q", "scan"]


def test_label_noise_is_seeded_scaled_by_the_labels_std_and_absent_at_zero() -> None:
    y = np.random.default_rng(0).normal(2.0, 3.0, size=20_000)
    assert oo.noisy_labels(y, 0.0, seed=1) is y
    a, b, c = (oo.noisy_labels(y, 0.5, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    noise = a - y
    assert abs(noise.mean()) < 0.05 and noise.std() == pytest.approx(0.5 * y.std(), rel=0.03)


def test_setting_order_puts_noise_after_the_clean_setting() -> None:
    df = pd.DataFrame({"setting": ["b", "a", "c"], "table": ["T"] * 3, "quantile": [0.5] * 3,
                       "rows": [1000, 1000, None], "noise": [0.5, 0.0, 0.0]})
    assert oo.setting_order(df) == ["c", "a", "b"]


def test_all_8mers_are_in_base4_order() -> None:
    codes = oo.all_8mers()
    assert codes.shape == (4**8, 8)
    np.testing.assert_array_equal(oo.base4_index(codes), np.arange(4**8))


def test_subsample_is_seeded_sorted_and_distinct() -> None:
    a, b = oo.subsample(1000, 100, 3), oo.subsample(1000, 100, 3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 100 and (np.diff(a) > 0).all()
    assert not np.array_equal(a, oo.subsample(1000, 100, 4))
    np.testing.assert_array_equal(oo.subsample(50, None, 0), np.arange(50))
    np.testing.assert_array_equal(oo.subsample(50, 80, 0), np.arange(50))


def test_design_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    objective, y = rng.normal(size=2000), rng.uniform(size=2000)
    in_off = rng.uniform(size=2000) < 0.3
    m = oo.design_metrics(objective, y, in_off, tops=(5, 50))
    top = sorted(range(2000), key=lambda i: -objective[i])
    assert m["argmax_oracle"] == y[top[0]] and m["argmax_in_off"] == in_off[top[0]]
    assert m["top5_median"] == pytest.approx(np.median(y[top[:5]]))
    assert m["top50_share_in_off"] == pytest.approx(in_off[top[:50]].mean())
    assert oo.design_metrics(y, y, in_off)["spearman_all"] == pytest.approx(1.0)
    # ties go to the lower design index, whatever the objective's dtype
    tied = oo.design_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), np.zeros(4, bool), tops=(2,))
    assert tied["argmax_oracle"] == 0.1 and tied["top2_median"] == pytest.approx(0.15)


def test_design_set_metrics_look_up_by_index() -> None:
    y = np.linspace(0, 1, 4**8)
    in_off = np.zeros(4**8, bool)
    in_off[:10] = True
    codes = oo.all_8mers()[[0, 0, 4**8 - 1]]
    m = oo.design_set_metrics(codes, y, in_off, best_offline=0.5)
    assert m["grad_distinct"] == 2 and m["grad_max"] == 1.0 and m["grad_median"] == 0.0
    assert m["grad_share_in_off"] == pytest.approx(2 / 3) and m["grad_frac_above_best"] == pytest.approx(1 / 3)


def test_bootstrap_ci_brackets_the_mean() -> None:
    lo, hi = oo.bootstrap_ci(np.array([0.1, 0.2, 0.6]))  # the library's (braid_ray.eval.stats)
    assert 0.1 <= lo < 0.3 < hi <= 0.6
    assert oo.bootstrap_ci(np.array([0.2, 0.2, 0.2])) == pytest.approx((0.2, 0.2))


def test_paired_differences_and_summary() -> None:
    rows = [{"setting": "s", "seed": seed, "method": m, "strength": k, "metric": v}
            for seed, base in ((0, 0.5), (1, 0.6)) for m, k, v in (("STRL", 0.0, base), ("BRAID-Boot", 1.0, base + 0.1),
                                                                     ("LCB", 0.1, base))]
    p = oo.paired(pd.DataFrame(rows), "metric")
    assert sorted(p["diff"].round(6)) == [0.0, 0.0, 0.1, 0.1]
    s = oo.diff_summary(p).set_index("label")
    assert s.loc["BRAID-Boot", "wins"] == 2 and s.loc["BRAID-Boot", "lo"] == pytest.approx(0.1)
    assert s.loc["LCB (k=0.1)", "ties"] == 2


def test_verdicts_use_the_t_interval_which_is_wider_than_the_bootstrap_over_few_seeds() -> None:
    diffs = [0.05, -0.01, 0.04, 0.02, -0.005, 0.03, 0.01, 0.045, -0.002, 0.025]  # mean 0.0203, sd 0.0213
    rows = [{"setting": "s", "seed": seed, "method": m, "strength": 0.0, "metric": v}
            for seed, d in enumerate(diffs) for m, v in (("STRL", 0.5), ("BRAID-Boot", 0.5 + d))]
    s = oo.diff_summary(oo.paired(pd.DataFrame(rows), "metric")).iloc[0]
    half = 2.262157 * np.std(diffs, ddof=1) / np.sqrt(10)  # t_{0.975, 9}
    assert (s["lo"], s["hi"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half), abs=1e-6)
    assert s["lo"] < s["boot_lo"] and s["boot_hi"] < s["hi"]
    assert oo._cell(s).endswith("**+**")  # the t interval excludes 0 here
    shifted = s.copy()
    shifted["lo"] = -0.001
    assert "**" not in oo._cell(shifted)  # the mark follows the t interval, not the bootstrap's
    assert oo._verdict(pd.Series([0.1, -0.1, -0.3]), pd.Series([0.2, 0.1, -0.2])) == "1 / 1 / 1"


def test_penalised_objective_is_what_gradient_ascent_sees() -> None:
    class Toy(torch.nn.Module):
        stats = type("S", (), {"y_std": 2.0})()

        def forward(self, x: torch.Tensor, penalty: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            r = x.sum((1, 2))
            return r, (r * 0.25 if penalty == "min" else torch.zeros_like(r))

    obj = oo.PenalisedObjective(Toy(), "min")
    r, g = obj(torch.ones(3, 8, 4), penalty="none")  # the caller's "none" is overridden by the fixed penalty
    assert torch.allclose(r, torch.full((3,), 24.0)) and torch.equal(g, torch.zeros(3)) and obj.stats.y_std == 2.0


def test_done_keys_resume(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    assert oo.done_keys(path) == set()
    path.write_text("\n".join(json.dumps({"setting": "s", "seed": 1, "method": m, "strength": k})
                              for m, k in (("STRL", 0.0), ("LCB", 0.1000000001))) + "\n")
    assert oo.done_keys(path) == {("s", 1, "STRL", 0.0), ("s", 1, "LCB", 0.1)}
    assert len(oo.methods()) == 2 + 2 * len(oo.STRENGTHS) + 2

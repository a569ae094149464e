"""Degenerate data stops at the data stage, before any model trains, saying what is wrong and what would fix it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braid_ray import pipeline
from braid_ray.data.splits import check_offline, offline_splits
from braid_ray.data.tables import Labelled
from tests.tiny import MODELS
from braid_ray.config import load_config


def _table(tmp_path: Path, y: np.ndarray, length: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list("ACGT"), length)) for _ in range(len(y))]
    path = tmp_path / "table.csv"
    pd.DataFrame({"seq": seqs, "y": y}).to_csv(path, index=False)
    return path


def _run(tmp_path: Path, path: Path, *overrides: str) -> None:
    cfg = load_config(None, [*MODELS, "task.name=csv", f"task.path={path}", "task.sequence_column=seq",
                             "task.label_column=y", f"run.dir={tmp_path / 'run'}", "oracle.kind=kmer_ridge", *overrides])
    pipeline.run(cfg)


def test_a_binary_screen_is_refused_before_anything_trains(tmp_path: Path) -> None:
    y = np.random.default_rng(0).random(400) < 0.3  # hit calls: 0 or 1
    with pytest.raises(ValueError, match=r"every D_off label is 0 .*2 distinct values.*use a continuous label"):
        _run(tmp_path, _table(tmp_path, y.astype(float)), "data.quantile=0.9")
    assert not (tmp_path / "run" / "reward").exists() and not (tmp_path / "run" / "oracle").exists()


def test_few_label_values_suggest_a_higher_quantile() -> None:
    y = np.repeat([0.0, 1.0, 2.0], [600, 200, 200])
    d = Labelled(np.random.default_rng(0).integers(0, 4, (1000, 8)).astype(np.int8), y, "screen.csv")
    with pytest.raises(ValueError, match="raise data.quantile so that D_off spans at least two label values"):
        check_offline(d, offline_splits(d, 0.0, 0.7, 0), trained_oracle=False)
    check_offline(d, offline_splits(d, 0.0, 0.9, 0), trained_oracle=False)  # D_off holds 0 and 1: accepted


def test_constant_labels_say_so_instead_of_a_quantile_hint() -> None:
    d = Labelled(np.zeros((100, 8), np.int8), np.full(100, 3.0), "flat.csv")
    with pytest.raises(ValueError, match="every label of D_0 is 3: there is nothing to rank"):
        offline_splits(d, 0.0, 0.5, 0)


@pytest.mark.parametrize("rows, length, overrides, message", [
    (5, 12, (), r"D_off has 2 row\(s\) .*needs at least 20"),
    (400, 1, (), r"1 letter\(s\), too short to design"),
    (150, 12, ("oracle.kind=trained_cnn", "data.oracle_fraction=0.2"), r"D_ora has 30 row\(s\); an oracle trained"),
])
def test_too_small_or_too_short_is_refused_at_the_data_stage(tmp_path: Path, rows: int, length: int,
                                                            overrides: tuple[str, ...], message: str) -> None:
    y = np.random.default_rng(1).normal(size=rows)
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, _table(tmp_path, y, length), *overrides)
    assert not (tmp_path / "run" / "reward").exists()

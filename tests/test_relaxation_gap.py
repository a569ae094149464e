"""benchmarks/relaxation_gap.py: r_hat on the relaxed x0 the reward sees in training against r_hat on the design."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from braid_ray import pipeline
from braid_ray.diffusion.sampler import FineTunedPolicy
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("relaxation_gap", ROOT / "benchmarks" / "relaxation_gap.py")
rg = importlib.util.module_from_spec(_spec)
sys.modules["relaxation_gap"] = rg
_spec.loader.exec_module(rg)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gap") / "run"
    pipeline.run(tiny_config(f"run.dir={path}"))
    return path


def test_rows_score_the_relaxed_input_and_the_decoded_design(run: Path) -> None:
    rows = rg.run_dir_rows(run, n=24)
    assert [r["method"] for r in rows] == ["Pretrained", "strl", "braid_bonus"]
    for r in rows:
        assert r["relaxation_gap"] == pytest.approx(r["r_hat_relaxed"] - r["r_hat_decoded"], abs=1e-5)
        assert 0.25 <= r["max_prob"] <= 1.0 and np.isfinite(r["oracle_median"]) and r["n"] == 24
    assert "| strl |" in rg.table(rows)


def test_the_gap_vanishes_when_the_relaxation_is_one_hot(run: Path) -> None:
    _, _, oracle, backbone, pretrained, reward = rg.load_run(run)
    backbone.temperature = 1e-4  # softmax(x0 / temperature) is the hard one-hot of argmax x0
    row = rg.gap(FineTunedPolicy(backbone, pretrained, "shift"), reward, oracle, 16, 8, seed=0)
    assert row["max_prob"] == pytest.approx(1.0, abs=1e-4)
    assert row["relaxation_gap"] == pytest.approx(0.0, abs=1e-4)
    assert row["bonus_relaxed"] == pytest.approx(row["bonus_decoded"], abs=1e-4)
    backbone.temperature = 1e3  # a near-uniform relaxation is another input: the reward differs
    soft = rg.gap(FineTunedPolicy(backbone, pretrained, "shift"), reward, oracle, 16, 8, seed=0)
    assert abs(soft["relaxation_gap"]) > 1e-6 and soft["max_prob"] < 0.5  # a one-epoch reward is nearly flat
    # the designs are the same samples either way: the temperature only changes what the reward sees
    assert soft["oracle_median"] == row["oracle_median"] and soft["r_hat_decoded"] == pytest.approx(row["r_hat_decoded"])

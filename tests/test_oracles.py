"""Evaluation oracles: the exact table, the pretrained Optimus 5-Prime, a CNN trained on D_ora."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from braid_ray.config import load_config
from braid_ray.data.encoding import encode_strings
from braid_ray.data.splits import offline_splits
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import get_task
from braid_ray.oracles import ExactTableOracle, Optimus5PrimeOracle, TrainedCNNOracle, build_oracle
from braid_ray.oracles.trained import pearson
from braid_ray.rundir import RunDir

# Golden predictions [HEK293T, T cells, HepG2] from the Optimus 5-Prime PROVENANCE (numpy float32 forward).
GOLDEN = {
    "CCACTCGATTAACATGTTAACAACATACTCGTCCGGCCGATCAGCGGCTA": (3.0792, 2.1182, 2.2568),
    "CAAACAACGAATGCCACTAAGTGGTTCGCGTACCGGAATAAATAAGAAAA": (6.2146, 4.8628, 3.8286),
    "ACCACGAACAGAGAAAATGAAACAAGATCCCGCGAAGGCAAACGCTAGAC": (3.4261, 2.4733, 2.4150),
    "TAGATGGATGACGAACATAGTGCAGTGGAACGAAGCGCACGCAAGCGAAA": (4.1465, 3.2184, 2.6006),
    "CCCATTGCTTGCGTAGACGACGAAAGTCAACTCATTGCATTCAGGCGATT": (8.2901, 6.4591, 4.9600),
}


def test_optimus_reproduces_its_golden_predictions() -> None:
    import torch

    from braid_ray.data.encoding import one_hot

    oracle = Optimus5PrimeOracle()
    codes = encode_strings(list(GOLDEN))
    with torch.no_grad():
        out = oracle.model(torch.from_numpy(one_hot(codes))).numpy()
    # The golden values are printed to 4 decimals: agreement to 1e-4 up to that rounding.
    np.testing.assert_allclose(out, np.array(list(GOLDEN.values())), atol=5e-5 + 1e-4)
    np.testing.assert_allclose(oracle.score(codes), out[:, 0], atol=1e-5)


def test_optimus_scores_a_whole_batch_like_single_rows() -> None:
    oracle = Optimus5PrimeOracle(batch_size=256)
    d = get_task(load_config(None, ["task.name=utr_mrl", "task.subset=ci"]).task).load()
    batch = oracle.score(d.codes)
    single = np.concatenate([oracle.score(d.codes[i:i + 1]) for i in range(0, 2000, 400)])
    np.testing.assert_allclose(batch[::400], single, atol=1e-4)
    assert pearson(batch, d.y) == pytest.approx(0.951, abs=0.002)  # PROVENANCE: r = 0.951 on the CI rows
    with pytest.raises(ValueError, match="50-nt"):
        oracle.score(d.codes[:, :49])


def test_exact_table_oracle_is_the_table() -> None:
    d = get_task(load_config().task).load()
    oracle = ExactTableOracle(d)
    rows = np.random.default_rng(0).integers(0, len(d), 100)
    np.testing.assert_array_equal(oracle.score(d.codes[rows]), d.y[rows])
    with pytest.raises(ValueError, match="all 16 sequences of length 2"):
        ExactTableOracle(Labelled(encode_strings(["AA", "AC"]), np.zeros(2), "tiny"))


def _motif_data(n: int = 1200, length: int = 20, seed: int = 0) -> Labelled:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (n, length)).astype(np.int8)
    y = (codes == 2).sum(1) + 2.0 * (codes[:, 5] == 0) + rng.normal(0, 0.3, n)
    return Labelled(codes, y, "synthetic")


def test_trained_oracle_learns_is_held_out_and_is_cached(tmp_path: Path) -> None:
    d = _motif_data()
    splits = offline_splits(d, 0.5, 0.6, seed=0)
    cfg = load_config(None, ["oracle.epochs=15", "oracle.channels=16", "oracle.hidden=32", "oracle.layers=2"])
    stage = RunDir(str(tmp_path)).stage("oracle")
    oracle = build_oracle("trained_cnn", get_task(cfg.task), d, splits, cfg.oracle, 0, stage)
    assert oracle.info["heldout_pearson"] > 0.8
    assert oracle.info["train_rows"] + oracle.info["heldout_rows"] == splits.ora.size
    # It generalises to D_0, which it never saw.
    assert pearson(oracle.score(d.codes[splits.zero]), d.y[splits.zero]) > 0.8
    again = build_oracle("trained_cnn", get_task(cfg.task), d, splits, cfg.oracle, 0, stage)
    np.testing.assert_allclose(again.score(d.codes[:50]), oracle.score(d.codes[:50]), atol=1e-6)
    assert isinstance(again, TrainedCNNOracle) and again.info == oracle.info


def test_trained_oracle_needs_d_ora(tmp_path: Path) -> None:
    d = _motif_data(100)
    splits = offline_splits(d, 0.0, 0.6, seed=0)
    cfg = load_config()
    with pytest.raises(ValueError, match="needs D_ora rows"):
        build_oracle("trained_cnn", get_task(cfg.task), d, splits, cfg.oracle, 0, RunDir(str(tmp_path)).stage("o"))

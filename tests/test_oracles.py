"""Evaluation oracles: the exact table, the pretrained Optimus 5-Prime, a CNN and a k-mer ridge trained on D_ora,
and two oracles side by side (primary and independent secondary) with their agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from braid_ray.config import load_config
from braid_ray.data.encoding import encode_strings
from braid_ray.data.splits import offline_splits
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import get_task
from braid_ray.eval.stats import pearson, rankdata, spearman
from braid_ray.oracles import (ExactTableOracle, KmerRidgeOracle, Optimus5PrimeOracle, OracleSet, TrainedCNNOracle,
                               agreement, build_oracle, build_oracles, method_agreement)
from braid_ray.oracles.kmer import KmerFeatures, default_features, heldout_split
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


# ---- the k-mer ridge oracle (an independent model family, trained on D_ora)

SMALL = KmerFeatures(20, positional=(1, 2), counts=(1, 2, 3))


def _kmer_data(n: int = 2000, seed: int = 0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random 20-mers with y linear in SMALL's k-mer features (10% of them non-zero) plus noise."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (n, 20)).astype(np.int8)
    w = rng.normal(0, 1, SMALL.width) * (rng.random(SMALL.width) < 0.1)
    return codes, SMALL.dense(codes) @ w + rng.normal(0, noise, n), w


def test_kmer_features_count_every_kmer() -> None:
    codes = encode_strings(["ACGTA", "AAAAA"])
    phi = KmerFeatures(5, positional=(1,), counts=(1, 2)).dense(codes)
    assert phi.shape == (2, 5 * 4 + 4 + 16)
    np.testing.assert_array_equal(phi[0, :20].reshape(5, 4), np.eye(4)[[0, 1, 2, 3, 0]])  # A C G T A
    np.testing.assert_array_equal(phi[:, 20:24], [[2, 1, 1, 1], [5, 0, 0, 0]])  # 1-mer counts
    assert phi[1, 24 + 0] == 4 and phi[1, 24:].sum() == 4  # AAAAA: AA four times
    assert phi[0, 24:].sum() == 4 and phi[0, 24 + 1] == 1 and phi[0, 24 + 12] == 1  # AC, ..., TA
    with pytest.raises(ValueError, match="k-mer size 6"):
        KmerFeatures(5, positional=(6,))
    assert default_features(4) == KmerFeatures(4, (1, 2, 3), (1, 2, 3, 4))  # no k-mer longer than the sequence


def test_kmer_ridge_learns_a_linear_kmer_signal() -> None:
    codes, y, w = _kmer_data()
    oracle = KmerRidgeOracle.fit(codes, y, seed=0, features=SMALL)
    assert oracle.info["heldout_pearson"] > 0.9 and oracle.info["heldout_spearman"] > 0.9
    assert oracle.info["heldout_rows"] == 200 and oracle.info["train_rows"] == 1800
    fresh, _, _ = _kmer_data(500, seed=1)  # other sequences, the same signal: no noise in the truth
    assert pearson(oracle.score(fresh), SMALL.dense(fresh) @ w) > 0.95


def test_kmer_ridge_equals_the_closed_form_solution() -> None:
    """Conjugate gradients on sparse products = the normal equations solved densely (one lambda)."""
    codes, y, _ = _kmer_data(600)
    lam = 0.1
    oracle = KmerRidgeOracle.fit(codes, y, seed=3, features=SMALL, lambdas=(lam,))
    _, tr = heldout_split(len(codes), 0.1, 3)
    phi = SMALL.dense(codes[tr])
    mu, sd = phi.mean(0), phi.std(0)
    scale = np.where(sd > 1e-6, sd, 1.0)
    phi_s = (phi - mu) / scale
    z = (y[tr] - y[tr].mean()) / y[tr].std()
    theta = np.linalg.solve(phi_s.T @ phi_s + lam * len(tr) * np.eye(SMALL.width), phi_s.T @ z)
    reference = y[tr].mean() + y[tr].std() * (phi_s @ theta)
    np.testing.assert_allclose(oracle.score(codes[tr]), reference, atol=1e-3 * y.std())


def test_kmer_ridge_is_deterministic_and_clips_counts_to_the_training_range() -> None:
    import torch

    codes, y, _ = _kmer_data(800)
    first = KmerRidgeOracle.fit(codes, y, seed=0, features=SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)  # the same weights on another number of threads
    try:
        second = KmerRidgeOracle.fit(codes, y, seed=0, features=SMALL)
    finally:
        torch.set_num_threads(threads)
    assert first.to_bytes() == second.to_bytes()
    other = KmerRidgeOracle.fit(codes, y, seed=1, features=SMALL)
    assert other.to_bytes() != first.to_bytes()
    _, tr = heldout_split(len(codes), 0.1, 0)
    # Within the training range clipping changes nothing; a homopolymer is outside it and is clipped.
    np.testing.assert_allclose(first.score(codes[tr]), first.score(codes[tr], clip=False), atol=1e-9)
    assert (first.out_of_range(codes[tr]) == 0).all()
    poly = encode_strings(["T" * 20])
    assert first.out_of_range(poly)[0] > 0
    phi = SMALL.dense(poly)
    clipped = np.clip(phi, first.clip_lo, first.clip_hi)
    assert clipped[0, SMALL.width - 1] < phi[0, SMALL.width - 1] == 18  # TTT, 18 times
    assert first.score(poly)[0] == pytest.approx(first.intercept + clipped[0] @ first.weight)
    assert first.score(poly, clip=False)[0] == pytest.approx(first.intercept + phi[0] @ first.weight)
    with pytest.raises(ValueError, match="length 20"):
        first.score(codes[:, :19])


def test_kmer_ridge_oracle_is_cached_in_safetensors_and_reused(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load as load_safetensors

    codes, y, _ = _kmer_data(1200)
    d = Labelled(codes, y, "synthetic")
    splits = offline_splits(d, 0.5, 0.6, seed=0)
    cfg = load_config()
    monkeypatch.setattr("braid_ray.oracles.default_features", lambda length: SMALL)
    stage = RunDir(str(tmp_path)).stage("oracle")
    oracle = build_oracle("kmer_ridge", get_task(cfg.task), d, splits, cfg.oracle, 0, stage)
    assert oracle.info["heldout_pearson"] > 0.8 and oracle.info["train_rows"] + 60 == splits.ora.size
    assert pearson(oracle.score(codes[splits.zero]), y[splits.zero]) > 0.8  # rows it never saw
    raw = (tmp_path / "oracle" / "kmer_ridge.safetensors").read_bytes()
    assert raw[:1] != b"\x80" and set(load_safetensors(raw)) == {"weight", "intercept", "clip_lo", "clip_hi"}

    def refit(*args, **kwargs):
        raise AssertionError("the cached k-mer ridge should have been loaded, not refitted")

    monkeypatch.setattr(KmerRidgeOracle, "fit", refit)
    again = build_oracle("kmer_ridge", get_task(cfg.task), d, splits, cfg.oracle, 0, stage)
    np.testing.assert_array_equal(again.score(codes[:50]), oracle.score(codes[:50]))
    assert again.info == oracle.info
    # Other D_ora rows: the cache does not apply, the model is fitted again.
    with pytest.raises(AssertionError, match="should have been loaded"):
        build_oracle("kmer_ridge", get_task(cfg.task), d, offline_splits(d, 0.5, 0.6, seed=1), cfg.oracle, 0, stage)
    with pytest.raises(ValueError, match="needs D_ora rows"):
        build_oracle("kmer_ridge", get_task(cfg.task), d, offline_splits(d, 0.0, 0.6, seed=0), cfg.oracle, 0, stage)


# ---- two oracles and their agreement

def test_rank_and_agreement_on_constructed_scores() -> None:
    np.testing.assert_array_equal(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    a = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    assert spearman(a, a**3) == pytest.approx(1.0) and pearson(a, a**3) < 0.99
    row = agreement(a, 2 * a + 1)
    assert row["pearson"] == pytest.approx(1.0) and row["spearman"] == pytest.approx(1.0)
    assert row["n"] == 5 and row["primary_median"] == 3.0 and row["secondary_median"] == 7.0
    assert agreement(a, -a)["spearman"] == pytest.approx(-1.0)
    assert np.isnan(agreement(a, np.ones(5))["pearson"]) and np.isnan(agreement(a[:1], a[:1])["spearman"])
    with pytest.raises(ValueError, match="one length"):
        agreement(a, a[:4])

    primary = {"good": np.array([9.0, 8.0, 7.0]), "hacked": np.array([11.0, 10.0, 12.0]),
               "base": np.array([5.0, 6.0, 4.0])}
    secondary = {"good": np.array([8.5, 8.0, 7.5]), "hacked": np.array([3.0, 2.0, 4.0]),
                 "base": np.array([5.0, 6.0, 4.0])}
    out = method_agreement(primary, secondary, best_offline=(8.5, 8.2))
    assert out["order_primary"] == ["hacked", "good", "base"]
    assert out["order_secondary"] == ["good", "base", "hacked"]
    assert out["method_ranking_spearman"] == pytest.approx(-0.5)
    m = out["methods"]
    assert m["good"]["pearson"] == pytest.approx(1.0) and m["base"]["spearman"] == pytest.approx(1.0)
    assert m["hacked"]["primary_frac_above_best"] == 1.0 and m["hacked"]["secondary_frac_above_best"] == 0.0
    assert m["good"]["primary_frac_above_best"] == pytest.approx(1 / 3)
    assert m["good"]["both_frac_above_best"] == pytest.approx(1 / 3)
    assert out["pooled"]["n"] == 9
    with pytest.raises(ValueError, match="different methods"):
        method_agreement(primary, {"good": secondary["good"]})


def test_build_oracles_puts_an_independent_oracle_beside_optimus(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None, ["task.name=utr_mrl", "task.subset=ci"])
    task = get_task(cfg.task)
    d = task.load()
    d = Labelled(d.codes[:600], d.y[:600], d.source)  # Optimus scores every row once: keep it short
    splits = offline_splits(d, 0.5, 0.6, seed=0)
    stage = RunDir(str(tmp_path)).stage("oracle")
    oracles = build_oracles(task, d, splits, cfg.oracle, 0, stage)
    assert oracles.primary.name == "optimus5p" and oracles.secondary.name == "kmer_ridge"
    assert oracles.summary["primary"]["shares_data_with_reward"] is True
    # It is an Oracle itself: the primary's name, info and scores, for code that knows one oracle only.
    assert oracles.name == "optimus5p" and oracles.info is oracles.primary.info
    np.testing.assert_array_equal(oracles.score(d.codes[:5]), oracles.primary.score(d.codes[:5]))
    held = oracles.heldout
    assert held["rows"] == 30 and held["primary_pearson"] > 0.8 and held["oracles_pearson"] > 0.3
    assert held["secondary_pearson"] == pytest.approx(oracles.secondary.info["heldout_pearson"])
    with monkeypatch.context() as m:  # built again: the ridge and the held-out agreement come from the stage
        m.setattr("braid_ray.oracles.heldout_agreement", lambda *a: pytest.fail("agreement not cached"))
        m.setattr(KmerRidgeOracle, "fit", lambda *a, **k: pytest.fail("ridge not cached"))
        assert build_oracles(task, d, splits, cfg.oracle, 0, stage).heldout == held
    designs = {"Offline (top)": d.codes[splits.off[:20]], "poly-T": encode_strings(["T" * 50] * 3)}
    out = oracles.compare(designs, best_offline_codes=d.codes[splits.off])
    assert set(out["agreement"]["methods"]) == set(designs) and out["best_offline"]["primary"] > 5
    assert out["agreement"]["methods"]["poly-T"]["secondary_frac_above_best"] == float(
        out["secondary"]["poly-T"][0] > out["best_offline"]["secondary"])
    np.testing.assert_allclose(out["primary"]["poly-T"], 8.78, atol=0.01)  # the hack the review found
    # No D_ora: "auto" leaves the secondary out and says why; asking for one by name fails.
    no_ora = offline_splits(d, 0.0, 0.6, seed=0)
    alone = build_oracles(task, d, no_ora, cfg.oracle, 0, stage)
    assert alone.secondary is None and "D_ora" in alone.why_no_secondary
    assert "secondary" not in alone.score_all(d.codes[:2])
    with pytest.raises(ValueError, match="needs D_ora rows"):
        build_oracles(task, d, no_ora, cfg.oracle, 0, stage, secondary="kmer_ridge")
    with pytest.raises(ValueError, match="must differ"):
        build_oracles(task, d, splits, cfg.oracle, 0, stage, primary="kmer_ridge", secondary="kmer_ridge")
    assert build_oracles(task, d, splits, cfg.oracle, 0, stage, secondary=None).secondary is None
    alone_out = alone.compare(designs, best_offline_codes=d.codes[splits.off])
    assert isinstance(alone, OracleSet) and alone_out["agreement"] is None and alone_out["secondary"] is None
    assert alone_out["best_offline"] == {"primary": out["best_offline"]["primary"], "secondary": None}

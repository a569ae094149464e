"""Evaluation metrics against brute-force references, figures, the report, FASTA, and bad input."""

from __future__ import annotations

import itertools
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braid_ray.data.encoding import decode, encode_strings
from braid_ray.eval import (COLUMNS, distinct, kmer_frequencies, kmer_pearson, mean_pairwise_hamming,
                            method_metrics, novelty, results_table, samples_frame, score_distributions, score_table,
                            to_markdown, top_rows, training_curves, write_fasta, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _codes(n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=(n, length)).astype(np.int8)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------------------------
# Metrics vs brute force


def test_score_table_on_a_hand_made_vector() -> None:
    t = score_table(np.arange(10.0), best_offline=6.5)
    assert t == {"n": 10, "median": 4.5, "mean": 4.5, "p90": pytest.approx(8.1), "max": 9.0,
                 "frac_above_best": 0.3}
    assert score_table(np.arange(10.0), best_offline=7.0)["frac_above_best"] == 0.2  # strictly above


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kmer_frequencies_match_python_counting(k: int) -> None:
    codes = _codes(7, 9, seed=k)
    counts = Counter(s[i:i + k] for s in decode(codes) for i in range(len(s) - k + 1))
    kmers = ["".join(p) for p in itertools.product("ACGT", repeat=k)]  # AAA, AAC, ..., TTT
    expected = np.array([counts[m] for m in kmers], dtype=float) / sum(counts.values())
    np.testing.assert_allclose(kmer_frequencies(codes, k), expected)


def test_kmer_pearson_is_one_on_itself_and_matches_corrcoef() -> None:
    a, b = _codes(20, 12, 1), _codes(15, 12, 2)
    assert kmer_pearson(a, a) == pytest.approx(1.0)
    expected = np.corrcoef(kmer_frequencies(a), kmer_frequencies(b))[0, 1]
    assert kmer_pearson(a, b) == pytest.approx(expected)
    poly_a = encode_strings(["AAAAAAAAAAAA"] * 3)
    assert kmer_pearson(poly_a, b) < 0.5  # one 3-mer only: unlike random sequences
    every_4mer = np.array(list(itertools.product(range(4), repeat=4)), dtype=np.int8)  # uniform 3-mers
    assert np.isnan(kmer_pearson(a[:, :4], every_4mer))


def test_top_rows_pick_the_best_share_with_a_floor() -> None:
    y = np.array([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    assert list(top_rows(y, 0.2)) == [1, 3]  # ties keep the table's order
    assert list(top_rows(y, 0.25)) == [1, 3, 7]  # ceil(2.5)
    assert list(top_rows(y, 0.001)) == [1] and list(top_rows(y, 0.001, min_rows=4)) == [1, 3, 7, 5]
    assert len(top_rows(y, 0.5, min_rows=50)) == 10
    assert len(top_rows(np.arange(65_536.0), 0.001)) == 66  # TFBind8's 3-mer reference
    with pytest.raises(ValueError, match=r"fraction: expected a share of the rows in \(0, 1\]"):
        top_rows(y, 0.0)


def test_mean_pairwise_hamming_matches_a_double_loop() -> None:
    codes = _codes(13, 10, 3)
    codes[5] = codes[2]  # a repeated design: a pair at distance 0
    pairs = list(itertools.combinations(range(len(codes)), 2))
    expected = np.mean([np.sum(codes[i] != codes[j]) for i, j in pairs])
    assert mean_pairwise_hamming(codes) == pytest.approx(expected)
    assert mean_pairwise_hamming(codes, max_pairs=len(pairs)) == pytest.approx(expected)  # still exact
    assert mean_pairwise_hamming(np.repeat(codes[:1], 4, axis=0)) == 0.0
    assert np.isnan(mean_pairwise_hamming(codes[:1]))


def test_sampled_hamming_agrees_with_exact() -> None:
    codes = _codes(300, 20, 4)
    codes[:100] = codes[0]  # structure, so the estimate is not trivially near 15
    exact = mean_pairwise_hamming(codes)
    sampled = mean_pairwise_hamming(codes, max_pairs=20_000, seed=1)
    assert sampled == pytest.approx(exact, abs=0.2)
    assert mean_pairwise_hamming(codes, max_pairs=20_000, seed=1) == sampled  # seeded
    assert mean_pairwise_hamming(codes, max_pairs=20_000, seed=2) != sampled  # and really sampled


def test_novelty_and_distinct_match_sets() -> None:
    reference = _codes(40, 6, 5)
    designs = np.concatenate([reference[:7], _codes(20, 6, 6), reference[:3]])
    ref_set = set(decode(reference))
    seqs = decode(designs)
    assert novelty(designs, reference) == pytest.approx(np.mean([s not in ref_set for s in seqs]))
    assert distinct(designs) == len(set(seqs))
    assert novelty(reference, reference) == 0.0


def test_method_metrics_has_every_column_of_the_table() -> None:
    codes, reference = _codes(30, 8, 7), _codes(100, 8, 8)
    m = method_metrics(codes, np.linspace(0, 1, 30), 0.5, reference)
    assert set(m) == set(COLUMNS) - {"method"}
    assert m["diversity"] == pytest.approx(mean_pairwise_hamming(codes))
    assert method_metrics(codes, np.ones(30), 0.5, reference, novelty_reference=codes)["novelty"] == 0.0


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call, message", [
    (lambda: novelty(_codes(3, 8), _codes(3, 9)), "codes have length 8 but reference_codes have length 9"),
    (lambda: kmer_pearson(_codes(3, 8), _codes(3, 9)), "codes have length 8 but reference_codes have length 9"),
    (lambda: distinct(np.zeros((0, 8), np.int8)), "codes: expected at least one design"),
    (lambda: mean_pairwise_hamming(np.zeros(8, np.int8)), "expected int codes of shape (N, L)"),
    (lambda: distinct(np.full((2, 3), 4)), "codes must lie in 0..3"),
    (lambda: distinct(np.zeros((2, 3))), "got dtype float64"),
    (lambda: kmer_frequencies(_codes(2, 3), k=4), "k: expected 1 <= k <= min(L, 12) = 3, got 4"),
    (lambda: score_table(np.array([]), 0.0), "scores: expected a non-empty vector"),
    (lambda: score_table(np.array([1.0, np.nan]), 0.0), "1 of 2 scores are not finite"),
    (lambda: score_table(np.ones(3), float("nan")), "best_offline: expected a finite score"),
    (lambda: method_metrics(_codes(3, 8), np.ones(4), 0.0, _codes(3, 8)), "3 designs but scores has 4"),
    (lambda: mean_pairwise_hamming(_codes(30, 4), max_pairs=0), "max_pairs: expected a positive number"),
    (lambda: results_table({"STRL": {"n": 3}}), "metrics_by_method['STRL']: missing"),
    (lambda: samples_frame({"a": _codes(2, 4)}, {"b": np.ones(2)}), "name different methods: ['a', 'b']"),
    (lambda: samples_frame({"a": _codes(2, 4)}, {"a": np.ones(2)}, {"r_hat": {"a": np.ones(3)}}),
     "extra['r_hat']['a']: expected shape (2,)"),
    (lambda: score_distributions({}, 0.0, "x.png", "t"), "scores_by_method: expected at least one method"),
    (lambda: training_curves({"STRL": pd.DataFrame({"step": [0]})}, "x.png"), "missing column(s) ['r_hat']"),
])
def test_bad_input_raises_a_clear_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ------------------------------------------------------------------------------------------------
# Figures, table, FASTA, report


@pytest.fixture
def designs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    codes = {"Offline (top)": _codes(50, 8, 10), "Pretrained": _codes(60, 8, 11), "STRL": _codes(40, 8, 12),
             "BRAID-Bonus": np.repeat(_codes(1, 8, 13), 5, axis=0)}  # collapsed: constant scores
    scores = {m: rng.normal(0.5 + 0.1 * i, 0.1, len(c)) for i, (m, c) in enumerate(codes.items())}
    scores["BRAID-Bonus"] = np.full(5, 0.9)
    return codes, scores


def test_plots_write_png_files(tmp_path: Path, designs) -> None:
    _, scores = designs
    box = score_distributions(scores, 0.7, tmp_path / "figs" / "scores.png", "TFBind8")
    width, height = _png_size(box)
    assert 400 <= width <= 3000 and 300 <= height <= 2000 and box.stat().st_size > 10_000
    steps = np.arange(0, 50, 5)
    curves = {"STRL": pd.DataFrame({"step": steps, "r_hat": steps / 50, "g_hat": 0.0, "kl": steps / 100,
                                    "oracle": np.where(steps % 10 == 0, steps / 80, np.nan)}),
              "BRAID-Bonus": pd.DataFrame({"step": steps, "r_hat": steps / 60, "g_hat": 0.1, "kl": 0.0})}
    curve = training_curves(curves, tmp_path / "curves.png")
    width, height = _png_size(curve)
    assert 600 <= width <= 3000 and 200 <= height <= 2000 and curve.stat().st_size > 10_000


def test_results_table_and_markdown(designs) -> None:
    codes, scores = designs
    reference = np.concatenate(list(codes.values()))
    df = results_table({m: method_metrics(codes[m], scores[m], 0.7, reference) for m in codes})
    assert list(df.columns) == COLUMNS and list(df["method"]) == list(codes)
    assert df.loc[3, "distinct"] == 1 and df.loc[3, "diversity"] == 0.0 and df.loc[3, "frac_above_best"] == 1.0
    md = to_markdown(df).splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and md[1].startswith("|---|---:|")
    assert md[5].startswith("| BRAID-Bonus | 5 | 0.9 | 0.9 | 0.9 | 0.9 | 1 | ")
    small = pd.DataFrame({"method": ["a|b"], "x": [1234.5], "y": [0.000123456], "z": [float("nan")], "w": [2.5e-7]})
    assert to_markdown(small).splitlines()[2] == r"| a\|b | 1230 | 0.000123 | - | 2.5e-07 |"


def test_fasta_round_trips(tmp_path: Path, designs) -> None:
    codes, scores = designs
    path = write_fasta(codes, scores, tmp_path / "designs.fasta")
    lines = path.read_text().splitlines()
    headers, seqs = lines[0::2], lines[1::2]
    assert headers[0].startswith(">Offline_top_0 oracle=")
    parsed = [re.fullmatch(r">(.+)_(\d+) oracle=(-?\d+\.\d{4})", h) for h in headers]
    assert all(parsed)
    expected = [(m, i, s, x) for m in codes for i, (s, x) in enumerate(zip(decode(codes[m]), scores[m]))]
    assert len(expected) == len(headers)
    for p, seq, (m, i, s, x) in zip(parsed, seqs, expected):
        assert int(p[2]) == i and seq == s and float(p[3]) == pytest.approx(x, abs=5e-5)
    np.testing.assert_array_equal(encode_strings(seqs[:50]), codes["Offline (top)"])


def test_samples_frame_with_extra_columns(designs) -> None:
    codes, scores = designs
    frame = samples_frame(codes, scores, {"r_hat": {"STRL": np.arange(40.0)}})
    assert list(frame.columns) == ["method", "index", "sequence", "oracle", "r_hat"]
    assert len(frame) == sum(len(c) for c in codes.values())
    strl = frame[frame["method"] == "STRL"]
    assert list(strl["sequence"]) == decode(codes["STRL"]) and list(strl["index"]) == list(range(40))
    np.testing.assert_array_equal(strl["r_hat"], np.arange(40.0))
    assert frame.loc[frame["method"] == "Pretrained", "r_hat"].isna().all()


def test_report_has_the_table_plots_and_notes(tmp_path: Path, designs) -> None:
    codes, scores = designs
    reference = np.concatenate(list(codes.values()))
    df = results_table({m: method_metrics(codes[m], scores[m], 0.7, reference) for m in codes})
    fig = score_distributions(scores, 0.7, tmp_path / "figs" / "scores.png", "TFBind8")
    report = write_report(tmp_path, "tfbind8", df, {"Oracle scores": fig}, ["BRAID-Bonus collapsed."])
    text = report.read_text()
    assert report == tmp_path / "report.md" and text.startswith("# tfbind8: evaluation")
    for row in to_markdown(df).splitlines():
        assert row in text
    assert "![Oracle scores](figs/scores.png)" in text and "- BRAID-Bonus collapsed." in text
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(tmp_path, "tfbind8", df, {"x": tmp_path / "missing.png"}, [])


def test_report_renders_further_tables_and_their_legend(tmp_path: Path, designs) -> None:
    codes, scores = designs
    df = results_table({m: method_metrics(codes[m], scores[m], 0.7, codes["Pretrained"]) for m in codes})
    validity = pd.DataFrame({"method": list(codes), "valid_share": [1.0, 0.9, 0.5, 0.0],
                             "homopolymer": [2.0, 3.0, 4.0, 8.0], "elbo": [-40.0, -41.0, -60.0, -90.0]})
    text = write_report(tmp_path, "utr_mrl", df, {}, [], {"Validity per design": validity}).read_text()
    head, rest = text.split("## Validity per design", 1)
    assert "| STRL | 40 |" in head and to_markdown(validity).splitlines()[5] in rest
    assert "- **valid_share**: fraction of designs the validity rule accepts" in rest
    assert "- **elbo**: median ELBO" in rest and "- **uatg**" not in text and "- **gc**" not in text

"""Bad input gets a clear error naming the file and the line or row, before any work starts."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braid_ray.config import load_config
from braid_ray.data.encoding import Locator, decode, encode, one_hot, reverse_complement, to_index
from braid_ray.data.tasks import get_task


def _csv(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    return p


def _load(path: Path, *extra: str):
    cfg = load_config(None, ["task.name=csv", f"task.path={path}", "task.sequence_column=seq",
                             "task.label_column=y", *extra])
    return get_task(cfg.task).load()


def test_encoding_round_trip_rna_lowercase_and_helpers() -> None:
    codes, keep = encode(["ACGT", "acgu", "UUAA"], Locator("x"))
    assert keep.all()
    assert decode(codes) == ["ACGT", "ACGT", "TTAA"]
    assert one_hot(codes).shape == (3, 4, 4) and (one_hot(codes).sum(-1) == 1).all()
    assert decode(reverse_complement(codes[:1])) == ["ACGT"]  # ACGT is its own reverse complement
    assert decode(reverse_complement(encode(["AACG"], Locator("x"))[0])) == ["CGTT"]
    assert to_index(encode(["AAAA", "AAAC", "TTTT"], Locator("x"))[0]).tolist() == [0, 1, 255]


def test_reads_csv_tsv_gzip_and_parquet_alike(tmp_path: Path) -> None:
    rows = {"seq": ["ACGT", "GGCC", "TTAA"], "y": [1.0, 2.5, -3.0]}
    frame = pd.DataFrame(rows)
    paths = [_csv(tmp_path, frame.to_csv(index=False)), _csv(tmp_path, frame.to_csv(index=False, sep="\t"), "t.tsv"),
             _csv(tmp_path, frame.to_csv(index=False), "t.csv.gz"), tmp_path / "t.parquet"]
    frame.to_parquet(paths[-1])
    for p in paths:
        d = _load(p)
        assert decode(d.codes) == rows["seq"] and d.y.tolist() == rows["y"], p


@pytest.mark.parametrize("text, message", [
    ("seq,y\nACGT,1\nACNT,2\n", "t.csv line 3: letter 'N' at position 3 is not one of A, C, G, T"),
    ("seq,y\nACGT,1\nACXT,2\nAXXT,3\n", "2 row(s) affected"),
    ("seq,y\nACGT,1\nACGTA,2\nACGA,3\n", "t.csv line 3: sequence has length 5, expected 4"),
    ("seq,y\nACGT,1\nACGA,nan\n", "t.csv line 3: label 'y' is missing or NaN, expected a finite number"),
    ("seq,y\nACGT,1\nACGA,\n", "t.csv line 3: label 'y' is missing or NaN"),
    ("seq,y\nACGT,inf\nACGA,1\n", "t.csv line 2: label 'y' is 'inf', expected a finite number"),
    ("seq,y\nACGT,1\nACGA,high\n", "t.csv line 3: label 'y' is 'high', expected a finite number"),
    ("seq,y\nACGT,1\n\nACGA,2\n", "t.csv line 3: empty or missing sequence"),
    ("sequence,label\nACGT,1\n", "missing column(s) ['seq', 'y']; the file has ['sequence', 'label']"),
    ("seq,y\n", "the table has a header but no rows"),
    ("", "the file is empty"),
])
def test_bad_tables_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        _load(_csv(tmp_path, text))
    assert message in str(err.value)


def test_missing_unreadable_and_parquet_row_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="table not found: .*nope.csv"):
        _load(tmp_path / "nope.csv")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="broken.csv.gz: cannot read as a table"):
        _load(broken)
    pq_path = tmp_path / "t.parquet"
    pd.DataFrame({"seq": ["ACGT", "ACGZ"], "y": [1.0, 2.0]}).to_parquet(pq_path)
    with pytest.raises(ValueError, match=r"t.parquet row 1: letter 'Z'"):
        _load(pq_path)


def test_fixed_length_and_dropping_invalid_letters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _csv(tmp_path, "seq,y\nACGT,1\nACNT,2\nGGGG,3\n")
    with caplog.at_level(logging.WARNING):
        d = _load(p, "task.invalid_letters=drop")
    assert decode(d.codes) == ["ACGT", "GGGG"] and d.y.tolist() == [1.0, 3.0]
    assert "t.csv line 3: letter 'N'" in caplog.text and "dropping" in caplog.text
    unlabelled = _csv(tmp_path, "seq,y\nACGT,1\nACNT,\nGGGG,3\n", "u.csv")  # a dropped row's label is never read
    assert _load(unlabelled, "task.invalid_letters=drop").y.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="length 4, expected 5 \\(task.length\\)"):
        _load(p, "task.length=5", "task.invalid_letters=drop")


def test_duplicates_are_merged_with_mean_label_and_a_warning(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    p = _csv(tmp_path, "seq,y\nACGT,1\nGGGG,5\nacgt,3\nTTTT,0\n")
    with caplog.at_level(logging.WARNING):
        d = _load(p)
    assert decode(d.codes) == ["ACGT", "GGGG", "TTTT"]
    np.testing.assert_allclose(d.y, [2.0, 5.0, 0.0])
    assert "1 duplicated sequence row(s) merged" in caplog.text


def test_enhancer_preset_reads_the_paper_layout(enhancer_table: Path) -> None:
    from tests.conftest import ROOT
    cfg = load_config(ROOT / "configs" / "enhancer_csv.yaml", [f"task.path={enhancer_table}"])
    d = get_task(cfg.task).load()
    assert len(d) == 120 and d.length == 200
    raw = pd.read_csv(enhancer_table)
    np.testing.assert_allclose(d.y, raw["hepg2"].to_numpy())
    k562 = load_config(ROOT / "configs" / "enhancer_csv.yaml", [f"task.path={enhancer_table}",
                                                                "task.label_column=k562"])
    np.testing.assert_allclose(get_task(k562.task).load().y, raw["k562"].to_numpy())

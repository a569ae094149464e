"""Tables exported from common tools, and the message each mistake gets (issue 14): named file, the fix."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from braid_ray.config import TaskConfig
from braid_ray.data.tasks import get_task


def _load(path: Path | str, **kw) -> None:
    get_task(TaskConfig(name="csv", path=str(path), sequence_column="seq", label_column="y", **kw)).load()


def test_a_directory_as_the_table(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory: give the table file itself"):
        _load(tmp_path)


def test_duplicate_column_names(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("seq,y,y\nACGTACGT,1,2\n")
    with pytest.raises(ValueError, match=r"t.csv: column\(s\) \['y'\] appear more than once"):
        _load(path)


def test_a_numeric_sequence_column(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"seq": [1234, 5678], "y": [1.0, 2.0]}).to_parquet(path)
    with pytest.raises(ValueError, match="column 'seq' holds int values, expected text sequences"):
        _load(path)


def test_a_semicolon_file_named_csv_with_decimal_commas(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("seq;y\nACGTACGT;1,5\nACGTACGA;2,25\n")
    with pytest.raises(ValueError, match="read as comma-separated .* seems semicolon-separated"):
        _load(path)
    tsv = tmp_path / "excel.tsv"
    tsv.write_text("seq\ty\nACGTACGT\t1,5\nACGTACGA\t2,25\n")
    with pytest.raises(ValueError, match=r"label 'y' is '1,5', expected a finite number \(a decimal comma\?"):
        _load(tsv)


def test_home_is_expanded_in_task_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with gzip.open(tmp_path / "t.csv.gz", "wt") as f:
        f.write("seq,y\nACGTACGT,1\nACGTACGA,2\n")
    _load("~/t.csv.gz")

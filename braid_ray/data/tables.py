"""Reading user tables (CSV / TSV / Parquet, gzip ok) into validated, encoded, labelled sequences."""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from braid_ray.data.encoding import Locator, decode, encode

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """A labelled design set D: int codes (N, L) over ACGT and measured labels y (N,)."""

    codes: np.ndarray
    y: np.ndarray
    source: str

    def __post_init__(self) -> None:
        assert self.codes.ndim == 2 and self.y.shape == (self.codes.shape[0],)

    @property
    def length(self) -> int:
        return int(self.codes.shape[1])

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"sequence": decode(self.codes), "y": self.y})


def check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give the table file itself (CSV, TSV or Parquet, plain or .gz)")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")


def _header(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        return f.readline()


def _delimiter_hint(path: Path, used: str) -> str:
    """Why columns may be missing: the header looks separated by another character than the one used."""
    try:
        header = _header(path)
    except (OSError, EOFError):  # a broken file: its own error says so
        return ""
    names = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
    other = max((d for d in names if d != used), key=header.count)
    if header.count(other) > header.count(used):
        return (f"; the file was read as {names[used]}-separated (from its name), but its header seems "
                f"{names[other]}-separated: convert it, or name it .tsv / .csv to match")
    return ""


def _delimiter(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return ","
    if name.endswith((".tsv", ".txt", ".tab")):
        return "\t"
    header = _header(path)
    return "\t" if header.count("\t") > header.count(",") else ","


def read_table(path: str | Path, columns: list[str], max_rows: int | None = None) -> tuple[pd.DataFrame, Locator]:
    """Read ``columns`` (all as strings) from a CSV/TSV/Parquet file, plain or gzip.

    Returns the frame and a Locator that maps row i back to its file line (text) or row (Parquet).
    """
    path = Path(path).expanduser()
    check_file(path)
    lower = path.name.lower()
    parquet = lower.endswith((".parquet", ".pq"))
    delimiter = None if parquet else _delimiter(path)
    try:
        if parquet:
            table = pq.read_table(path)
            locator = Locator(str(path), first_line=None)
        else:
            # Empty lines are kept (as nulls) so that row i is always file line i + 2.
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 24),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                     strings_can_be_null=True),
            )
            locator = Locator(str(path), first_line=2)
    except (pa.ArrowInvalid, OSError, EOFError, gzip.BadGzipFile) as e:
        hint = _delimiter_hint(path, delimiter) if delimiter else ""
        raise ValueError(f"{path}: cannot read as a table ({type(e).__name__}: {e}){hint}") from None
    names = table.column_names
    twice = sorted({c for c in columns if names.count(c) > 1})
    if twice:
        raise ValueError(f"{path}: column(s) {twice} appear more than once in the header; rename the copies")
    missing = [c for c in columns if c not in names]
    if missing:
        hint = _delimiter_hint(path, delimiter) if delimiter else ""
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {names}{hint}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: the table has a header but no rows")
    frame = table.select(columns).slice(0, max_rows).to_pandas()
    return frame, locator


def check_text(values: pd.Series, locator: Locator, column: str) -> None:
    """A sequence column must hold text (a Parquet export may have stored numbers or bytes)."""
    kinds = {type(v).__name__ for v in values.dropna().iloc[:1000] if not isinstance(v, str)}
    if kinds:
        raise ValueError(f"{locator.source}: column {column!r} holds {', '.join(sorted(kinds))} values, expected "
                         "text sequences over A, C, G, T")


def parse_labels(values: pd.Series, locator: Locator, column: str, keep: np.ndarray | None = None) -> np.ndarray:
    """Strings or numbers -> float64 labels; NaN, inf, missing or non-numeric values raise naming the line.
    ``keep``: a boolean mask of the rows that stay (the others, e.g. dropped sequences, are not checked)."""
    y = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(y) & (True if keep is None else keep))
    if bad.size:
        i = int(bad[0])
        raw = values.iloc[i]
        what = "missing or NaN" if raw is None or (isinstance(raw, float) and np.isnan(raw)) else f"{raw!r}"
        comma = isinstance(raw, str) and re.fullmatch(r"\s*[-+]?\d*,\d+\s*", raw)
        hint = " (a decimal comma? write numbers with a decimal point)" if comma else ""
        raise ValueError(f"{locator.where(i)}: label {column!r} is {what}, expected a finite number{hint}; "
                         f"{bad.size} row(s) have no finite label")
    return y


def merge_duplicates(codes: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge rows with identical sequences into one row with the mean label (with a warning)."""
    keys = np.ascontiguousarray(codes).view(np.dtype((np.void, codes.shape[1])))[:, 0]
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    if len(first) == len(codes):
        return codes, y
    order = np.argsort(first)  # keep the order of first appearance
    sums = np.bincount(inverse, weights=y, minlength=len(first))
    n_dup = int(len(codes) - len(first))
    log.warning("%s: %d duplicated sequence row(s) merged into %d sequence(s), label = mean of the copies",
                source, n_dup, int((counts > 1).sum()))
    return codes[first[order]], (sums / counts)[order]


def labelled_from_frame(
    frame: pd.DataFrame,
    locator: Locator,
    sequence_column: str,
    label_column: str,
    length: int | None = None,
    invalid_letters: str = "error",
) -> Labelled:
    """Validate a frame of (sequence, label) strings into a Labelled set, duplicates merged."""
    check_text(frame[sequence_column], locator, sequence_column)
    codes, keep = encode(frame[sequence_column].tolist(), locator, length, invalid_letters)
    y = parse_labels(frame[label_column], locator, label_column, keep)
    codes, y = merge_duplicates(codes, y[keep], locator.source)
    return Labelled(codes, y, locator.source)

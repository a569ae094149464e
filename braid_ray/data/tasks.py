"""Tasks by name: each one turns its table (bundled or the user's) into a labelled design set D.

A task also names its defaults for the offline protocol (the q of D_off, the share of D_ora) and its
evaluation oracle. Add a task by writing a loader and registering it in ``TASKS``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from braid_ray.config import TaskConfig, validate_task
from braid_ray.data.encoding import Locator, encode, from_index, reverse_complement, to_index
from braid_ray.data.tables import Labelled, check_file, labelled_from_frame, merge_duplicates, parse_labels, read_table

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass
class Task:
    name: str
    path: Path  # the table D is read from
    default_quantile: float  # D_off = D_0 below this quantile of y (paper section 7.1)
    default_oracle_fraction: float  # share of D held out as D_ora
    default_oracle: str  # name in braid_ray.oracles.ORACLES
    description: str
    cfg: TaskConfig = field(repr=False, default_factory=TaskConfig)

    def load(self) -> Labelled:
        """Read, validate and encode the table into D."""
        raise NotImplementedError(f"{type(self).__name__} must define load()")

    def input_files(self) -> list[Path]:
        return [self.path]


class TFBind8(Task):
    """All 8-mers with PBM E-scores (UniPROBE layout); both strands are designs, y = min-max E-score."""

    def load(self) -> Labelled:
        path = self.path
        check_file(path)
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", errors="replace") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        if len(header) < 3 or header[0] != "8-mer" or header[1] != "8-mer" or header[2] != "E-score":
            raise ValueError(f"{path} line 1: expected the UniPROBE 8-mer layout, tab-separated columns "
                             f"'8-mer', '8-mer' (reverse complement), 'E-score', ...; found {header[:3]}")
        try:
            table = pacsv.read_csv(
                path, read_options=pacsv.ReadOptions(skip_rows=1, column_names=[f"c{i}" for i in range(len(header))]),
                parse_options=pacsv.ParseOptions(delimiter="\t", ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(column_types={f"c{i}": pa.string() for i in range(3)}))
        except (pa.ArrowInvalid, OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read as a tab-separated table ({e})") from None
        frame = table.select(["c0", "c1", "c2"]).to_pandas()
        loc = Locator(str(path), first_line=2)
        escore = parse_labels(frame["c2"], loc, "E-score")
        fwd, _ = encode(frame["c0"].tolist(), loc, length=8)
        rev, _ = encode(frame["c1"].tolist(), loc, length=8)
        mismatch = np.flatnonzero((reverse_complement(fwd) != rev).any(axis=1))
        if mismatch.size:
            raise ValueError(f"{loc.where(int(mismatch[0]))}: the second 8-mer is not the reverse complement "
                             f"of the first; {mismatch.size} row(s) affected")
        span = escore.max() - escore.min()
        if span <= 0:
            raise ValueError(f"{path}: every E-score is the same, nothing to optimise")
        y = (escore - escore.min()) / span  # design-bench normalisation over the table
        palindrome = (fwd == rev).all(axis=1)  # listed once; add the other strand only where it differs
        codes = np.concatenate([fwd, rev[~palindrome]])
        codes, y = merge_duplicates(codes, np.concatenate([y, y[~palindrome]]), str(path))
        covered = np.unique(to_index(codes)).size
        if covered != 4**8:
            raise ValueError(f"{path}: covers {covered} of the 65,536 8-mers (both strands); "
                             "the exact oracle needs every 8-mer")
        return Labelled(codes, y, str(path))


class TFBind5(TFBind8):
    """All 1,024 5-mers, y = the mean TFBind8 value of the 64 8-mers that begin with the 5-mer: a tiny task
    whose exact oracle is the table itself, small enough to enumerate in milliseconds (tests, quick looks)."""

    def load(self) -> Labelled:
        d8 = super().load()
        index = to_index(d8.codes[:, :5])
        y = np.bincount(index, weights=d8.y, minlength=4**5) / np.bincount(index, minlength=4**5)
        return Labelled(from_index(np.arange(4**5), 5).astype(d8.codes.dtype), y, f"{d8.source} (5-mer prefixes)")


class UTRMeanRibosomeLoad(Task):
    """Sample et al. 2019 50-nt 5'UTRs with measured mean ribosome load (column rl)."""

    def load(self) -> Labelled:
        frame, loc = read_table(self.path, ["utr", "rl"], self.cfg.max_rows)
        return labelled_from_frame(frame, loc, "utr", "rl", self.cfg.length or 50, self.cfg.invalid_letters)


class DHSAccessibility(Task):
    """200-bp DHS sequences; y = log1p(total DNase signal) for DHSs of the target cell type, 0 for the others.

    A stand-in for the paper's enhancer task (MPRA activity), which cannot be obtained here: the label is
    cell-type-specific chromatin accessibility, not enhancer activity.
    """

    def load(self) -> Labelled:
        frame, loc = read_table(self.path, ["sequence", "TAG", "total_signal"], self.cfg.max_rows)
        signal = parse_labels(frame["total_signal"], loc, "total_signal")
        cell = frame["TAG"].fillna("").str.split("_").str[0]
        y = np.where(cell == self.cfg.cell_type, np.log1p(np.maximum(signal, 0.0)), 0.0)
        labelled = pd.DataFrame({"sequence": frame["sequence"], "y": y})
        return labelled_from_frame(labelled, loc, "sequence", "y", self.cfg.length or 200, self.cfg.invalid_letters)


class UserTable(Task):
    """Any CSV / TSV / Parquet table with a sequence column and a numeric label column."""

    def load(self) -> Labelled:
        c = self.cfg
        frame, loc = read_table(self.path, [c.sequence_column, c.label_column], c.max_rows)
        return labelled_from_frame(frame, loc, c.sequence_column, c.label_column, c.length, c.invalid_letters)


def _tfbind8(c: TaskConfig) -> Task:
    return TFBind8("tfbind8", Path(c.path).expanduser() if c.path else ASSETS / "tfbind8_six6" / "SIX6_REF_R1_8mers.txt",
                   0.5, 0.0, "table", "TFBind8: all 8-mers, PBM binding E-score (SIX6_REF_R1 by default)", c)


def _tfbind5(c: TaskConfig) -> Task:
    return TFBind5("tfbind5", Path(c.path).expanduser() if c.path else ASSETS / "tfbind8_six6" / "SIX6_REF_R1_8mers.txt",
                   0.5, 0.0, "table", "TFBind5: all 5-mers, mean E-score of their 8-mer extensions (tiny, exact)", c)


def _utr_mrl(c: TaskConfig) -> Task:
    bundled = "utr_mrl_ci_2k.csv" if c.subset == "ci" else "utr_mrl_egfp_unmod_1_top280k.csv.gz"
    return UTRMeanRibosomeLoad("utr_mrl", Path(c.path).expanduser() if c.path else ASSETS / "utr_mrl_sample2019" / bundled,
                               0.6, 0.5, "optimus5p", "5'UTR mean ribosome load (Sample et al. 2019)", c)


def _dhs(c: TaskConfig) -> Task:
    bundled = ASSETS / "dhs_4celltypes_dnadiffusion" / "K562_hESCT0_HepG2_GM12878_12k_sequences_per_group.txt.gz"
    return DHSAccessibility("dhs", Path(c.path).expanduser() if c.path else bundled, 0.95, 0.5, "trained_cnn",
                            f"200-bp DHS accessibility in {c.cell_type} (stand-in for the enhancer task)", c)


def _csv(c: TaskConfig) -> Task:
    return UserTable("csv", Path(c.path or "").expanduser(), 0.9, 0.5, "trained_cnn",
                     f"user table {c.path} ({c.sequence_column} -> {c.label_column})", c)


TASKS = {"tfbind8": _tfbind8, "tfbind5": _tfbind5, "utr_mrl": _utr_mrl, "dhs": _dhs, "csv": _csv}


def get_task(c: TaskConfig) -> Task:
    validate_task(c)  # a TaskConfig built in code, not loaded: the same rules (braid_ray.config) as at load time
    return TASKS[c.name](c)

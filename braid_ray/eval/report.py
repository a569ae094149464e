"""Evaluation outputs: the results table, its Markdown, the designs as FASTA and as a table, report.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from braid_ray.data.encoding import decode
from braid_ray.eval.metrics import check_codes, check_scores

COLUMNS = ["method", "n", "median", "mean", "p90", "max", "frac_above_best", "kmer_pearson", "diversity",
           "novelty", "distinct"]

COLUMN_NOTES = {
    "n": "designs evaluated",
    "median, mean, p90, max": "oracle score of the designs",
    "frac_above_best": "fraction of designs scoring strictly above the best offline design",
    "kmer_pearson": "Pearson correlation of 3-mer frequencies with the reference (by default the measured top "
                    "0.1% of D, as in DRAKES; the ref: rows show what a value means)",
    "diversity": "mean pairwise Hamming distance between designs, in positions",
    "novelty": "fraction of designs not in the reference table",
    "distinct": "number of distinct designs",
    "valid_share": "fraction of designs the validity rule accepts (not hacked)",
    "median_valid": "median oracle score over the valid designs only",
    "median_penalized": "median oracle score over all designs, each invalid design scored as the worst offline "
                        "design (a hacked design is a failure)",
    "above_best_valid": "fraction of all designs that are valid and score strictly above the best offline design",
    "homopolymer": "median longest homopolymer run, in positions",
    "entropy": "median Shannon entropy of the letter composition, in bits (2 = uniform, 0 = homopolymer)",
    "gc": "median GC fraction",
    "nn_distance": "median Hamming distance to the nearest sequence of D, in positions (0 = in D)",
    "elbo": "median ELBO under the pretrained diffusion model, in nats per sequence (a lower bound on "
            "log p; higher = more like D)",
    "uatg": "mean number of upstream ATGs (start codons) per design",
}


def results_table(metrics_by_method: dict[str, dict]) -> pd.DataFrame:
    """One row per method (in the dict's order) from ``method_metrics`` dicts; columns ``COLUMNS``, then
    any further keys the dicts have."""
    if not metrics_by_method:
        raise ValueError("metrics_by_method: expected at least one method, got none")
    for method, metrics in metrics_by_method.items():
        missing = [c for c in COLUMNS[1:] if c not in metrics]
        if missing:
            raise ValueError(f"metrics_by_method[{method!r}]: missing {missing}; expected the keys of "
                             "braid_ray.eval.method_metrics")
    df = pd.DataFrame([{"method": m, **metrics} for m, metrics in metrics_by_method.items()])
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)


def _cell(x: object) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return "-" if np.isnan(x) else str(x)
        if x == 0 or 1e-4 <= abs(x) < 1e6:  # 3 significant digits, positional: 1234.5 -> 1230, 0.5 -> 0.5
            return np.format_float_positional(x, precision=3, unique=False, fractional=False, trim="-")
        return f"{x:.3g}"
    return str(x).replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table of ``df``: floats to 3 significant digits, NaN as "-", numeric columns right-aligned."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _check_designs(codes_by_method: dict[str, np.ndarray],
                   scores_by_method: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not codes_by_method:
        raise ValueError("codes_by_method: expected at least one method, got none")
    if set(codes_by_method) != set(scores_by_method):
        raise ValueError(f"codes_by_method and scores_by_method name different methods: "
                         f"{sorted(set(codes_by_method) ^ set(scores_by_method))} in only one of them")
    out = {}
    for m in codes_by_method:
        codes = check_codes(codes_by_method[m], f"codes_by_method[{m!r}]")
        scores = check_scores(scores_by_method[m], f"scores_by_method[{m!r}]")
        if len(codes) != len(scores):
            raise ValueError(f"method {m!r}: {len(codes)} designs but {len(scores)} scores")
        out[m] = codes, scores
    return out


def fasta_id(method: str) -> str:
    """A method name as a FASTA identifier: runs of characters other than letters, digits, '.', '-' -> '_'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", method).strip("_") or "method"


def write_fasta(codes_by_method: dict[str, np.ndarray], scores_by_method: dict[str, np.ndarray],
                path: str | Path) -> Path:
    """Every method's designs (N_m, L) as FASTA, one sequence per line, in each method's row order.

    Headers read ``>{fasta_id(method)}_{row} oracle={score:.4f}``, e.g. ``>Offline_top_17 oracle=0.8123``
    for row 17 of "Offline (top)"; row numbers match ``samples_frame``'s ``index``.
    """
    designs = _check_designs(codes_by_method, scores_by_method)
    ids = {m: fasta_id(m) for m in designs}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"method names collide as FASTA identifiers: {ids}; rename the methods")
    lines = []
    for m, (codes, scores) in designs.items():
        for i, (seq, score) in enumerate(zip(decode(codes), scores)):
            lines += [f">{ids[m]}_{i} oracle={score:.4f}", seq]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def samples_frame(codes_by_method: dict[str, np.ndarray], scores_by_method: dict[str, np.ndarray],
                  extra: dict[str, dict[str, np.ndarray]] | None = None) -> pd.DataFrame:
    """Every design as a row: method, index (row within the method), sequence, oracle, then extra columns.

    ``extra`` maps a column name to per-method values (N_m,), like ``scores_by_method`` does, e.g.
    ``{"r_hat": r_hat_by_method, "g_hat": g_hat_by_method}``; a method missing from a column gets NaN.
    """
    designs = _check_designs(codes_by_method, scores_by_method)
    extra = extra or {}
    clash = [c for c in extra if c in ("method", "index", "sequence", "oracle")]
    if clash:
        raise ValueError(f"extra: column(s) {clash} clash with the standard columns method, index, sequence, "
                         "oracle")
    for column, by_method in extra.items():
        unknown = sorted(set(by_method) - set(designs))
        if unknown:
            raise ValueError(f"extra[{column!r}]: unknown method(s) {unknown}; methods are {list(designs)}")
    frames = []
    for m, (codes, scores) in designs.items():
        frame = pd.DataFrame({"method": m, "index": np.arange(len(codes)), "sequence": decode(codes),
                              "oracle": scores})
        for column, by_method in extra.items():
            if m not in by_method:
                frame[column] = np.nan
                continue
            values = np.asarray(by_method[m])
            if values.shape != (len(codes),):
                raise ValueError(f"extra[{column!r}][{m!r}]: expected shape ({len(codes)},), one value per "
                                 f"design, got {values.shape}")
            frame[column] = values
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def write_report(out_dir: str | Path, task: str, df: pd.DataFrame, plots: dict[str, Path],
                 notes: list[str], tables: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write ``out_dir/report.md``: a title, the results table, each further table (a heading -> a frame)
    under its heading, one column legend for them all, each plot (a caption -> PNG path) as a relative image
    link, and the notes as bullets. Returns the report's path."""
    out_dir = Path(out_dir)
    missing = {name: str(p) for name, p in plots.items() if not Path(p).is_file()}
    if missing:
        raise FileNotFoundError(f"plots: no such file(s) {missing}")
    tables = tables or {}
    lines = [f"# {task}: evaluation", "", to_markdown(df).rstrip("\n"), ""]
    for name, table in tables.items():
        lines += [f"## {name}", "", to_markdown(table).rstrip("\n"), ""]
    shown = set(df.columns).union(*(t.columns for t in tables.values()))
    lines += [f"- **{column}**: {note}" for column, note in COLUMN_NOTES.items() if column.split(",")[0] in shown]
    for name, p in plots.items():
        rel = Path(os.path.relpath(Path(p).resolve(), out_dir.resolve())).as_posix()
        lines += ["", f"## {name}", "", f"![{name}]({rel})"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

"""The paper's offline protocol (section 7.1): D -> D_ora | D_0, and D_off = rows of D_0 below a quantile of y;
or, as a harder benchmark, a mutational scan: D_off = the rows of D_0 within a Hamming distance of one wild type."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from braid_ray.data.encoding import decode
from braid_ray.data.tables import Labelled

log = logging.getLogger(__name__)

MIN_LENGTH = 4  # letters: shorter sequences leave nothing to design
MIN_OFFLINE_ROWS = 20  # D_off rows the reward ensemble needs (held-out calibration rows and bootstrap resamples)
MIN_ORACLE_ROWS = 50  # D_ora rows an oracle trained on them needs (its own validation rows included)
FEW_VALUES = 10  # labels with at most this many distinct values are reported (screens, rounded scores)


@dataclass
class Splits:
    """Row indices into D for each split, plus what defines D_off: the quantile threshold, or the scan's wild
    type and radius."""

    ora: np.ndarray  # D_ora: held out for the oracle (may be empty where an exact/pretrained oracle exists)
    zero: np.ndarray  # D_0 = D \\ D_ora
    off: np.ndarray  # D_off: rows of D_0 with y < threshold (or in the scan); the only labels the method ever sees
    threshold: float  # the q-quantile of y over D_0 (a scan: its wild type's y)
    quantile: float
    oracle_fraction: float
    scan_radius: int | None = None  # a mutational scan: D_off = D_0 rows within this Hamming distance of ...
    wild_type: int | None = None  # ... this row of D; None = the quantile split

    @property
    def rule(self) -> str:
        """D_off's definition, in words."""
        if self.scan_radius is None:
            return f"D_0 below its {self.quantile:g} quantile, y < {self.threshold:.4g}"
        return (f"D_0 within Hamming distance {self.scan_radius} of the wild type (row {self.wild_type}, "
                f"y = {self.threshold:.4g})")


def below_quantile(y: np.ndarray, quantile: float, source: str, rows: str = "D") -> tuple[np.ndarray, float]:
    """The offline rule of both domains: the rows strictly below the ``quantile`` of y (so no row at the
    threshold, often tied on discrete scores, leaks in), as a mask, and the threshold."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if np.ptp(y) == 0:
        raise ValueError(f"{source}: every label of {rows} is {y[0]:g}: there is nothing to rank or to optimise "
                         "(check the label column)")
    threshold = float(np.quantile(y, quantile))
    below = y < threshold
    if not below.any():
        raise ValueError(f"{source}: no row of {rows} lies below the {quantile} quantile ({threshold:.4g}); "
                         "the labels are too coarse for this quantile, choose a higher data.quantile")
    return below, threshold


def scan_rows(codes: np.ndarray, y: np.ndarray, quantile: float, radius: int, seed: int,
              wild_type: int | None = None) -> tuple[np.ndarray, int]:
    """A mutational scan over rows (codes (N, L), y (N,)): the wild type (given, or drawn, seeded and the same
    for every radius, among the rows whose rank in y lies within 0.005 of ``quantile``; on fewer than about 100
    rows, the row whose rank is nearest) and the sorted indices of every row within Hamming distance ``radius``
    of it."""
    if wild_type is None:
        rank = np.argsort(np.argsort(y, kind="stable"), kind="stable") / max(len(y) - 1, 1)
        near = np.flatnonzero(np.abs(rank - quantile) <= 0.005)
        if not near.size:
            near = np.array([int(np.argmin(np.abs(rank - quantile)))])
        wild_type = int(np.random.default_rng([seed, round(quantile * 10_000), 11]).choice(near))
    ball = np.flatnonzero((codes != codes[wild_type]).sum(axis=1) <= radius)
    return ball, wild_type


def offline_splits(d: Labelled, oracle_fraction: float, quantile: float, seed: int,
                   scan_radius: int | None = None, wild_type: np.ndarray | None = None) -> Splits:
    """Seeded random D_ora / D_0 split, then D_off = {i in D_0 : y_i < quantile_q(y over D_0)}; or, with
    ``scan_radius``, D_off = the rows of D_0 within that Hamming distance of a wild type: the sequence
    ``wild_type`` (codes (L,), a row of D_0), or a seeded draw among D_0's rows at ``quantile`` of y."""
    if not 0.0 <= oracle_fraction < 1.0:
        raise ValueError(f"oracle_fraction must be in [0, 1), got {oracle_fraction}")
    n = len(d)
    perm = np.random.default_rng(seed).permutation(n)
    n_ora = int(round(oracle_fraction * n))
    ora, zero = np.sort(perm[:n_ora]), np.sort(perm[n_ora:])
    if zero.size == 0:
        raise ValueError(f"{d.source}: D_0 is empty with oracle_fraction={oracle_fraction} on {n} rows")
    if scan_radius is None:
        below, threshold = below_quantile(d.y[zero], quantile, d.source, "D_0")
        return Splits(ora, zero, zero[below], threshold, quantile, oracle_fraction)
    if scan_radius >= d.length:
        raise ValueError(f"{d.source}: data.scan_radius={scan_radius} reaches every sequence of {d.length} letters "
                         f"(D_off would be all of D_0); give a radius below {d.length}")
    given = None
    if wild_type is not None:
        wild_type = np.asarray(wild_type)
        if wild_type.shape != (d.length,):
            raise ValueError(f"{d.source}: data.wild_type has {wild_type.size} letters, the sequences {d.length}")
        match = np.flatnonzero((d.codes[zero] == wild_type).all(axis=1))
        if not match.size:
            where = "in D_ora" if (d.codes[ora] == wild_type).all(axis=1).any() else "not in the table"
            raise ValueError(f"{d.source}: data.wild_type is {where}; a scan's wild type must be a measured row of "
                             "D_0 (give a sequence of the table, or lower data.oracle_fraction)")
        given = int(match[0])
    ball, centre = scan_rows(d.codes[zero], d.y[zero], quantile, scan_radius, seed, given)
    return Splits(ora, zero, zero[ball], float(d.y[zero[centre]]), quantile, oracle_fraction, scan_radius,
                  int(zero[centre]))


def check_offline(d: Labelled, s: Splits, trained_oracle: bool) -> None:
    """Degenerate data stops at the data stage, before any model trains, with what is wrong and what would fix
    it: sequences too short to design, too few rows for the reward ensemble (or for an oracle trained on
    D_ora), and offline labels that do not vary (a binary screen under any quantile: D_off then holds only its
    lower value, and the reward would learn a constant)."""
    if d.length < MIN_LENGTH:
        raise ValueError(f"{d.source}: the sequences have {d.length} letter(s), too short to design (at least "
                         f"{MIN_LENGTH}); check the sequence column and task.length")
    if s.off.size < MIN_OFFLINE_ROWS:
        fix = "raise data.quantile" if s.scan_radius is None else "raise data.scan_radius"
        raise ValueError(f"{d.source}: D_off has {s.off.size} row(s) ({s.rule}); the reward ensemble needs at "
                         f"least {MIN_OFFLINE_ROWS} (its held-out rows and bootstrap resamples): give a larger "
                         f"table or {fix}")
    if trained_oracle and s.ora.size < MIN_ORACLE_ROWS:
        raise ValueError(f"{d.source}: D_ora has {s.ora.size} row(s); an oracle trained on them needs at least "
                         f"{MIN_ORACLE_ROWS}: raise data.oracle_fraction or give a larger table")
    values = np.unique(d.y[s.zero])
    shown = ", ".join(f"{v:g}" for v in values[:FEW_VALUES])
    y_off = d.y[s.off]
    if np.ptp(y_off) == 0:
        scan = s.scan_radius is not None
        rule = s.rule if scan else f"rows strictly below the {s.quantile} quantile, {s.threshold:g}, are offline"
        fix = ("raise data.scan_radius, choose another data.wild_type, or use a finer label" if scan else
               "a label with two values (a hit call) cannot be ranked below a threshold: use a continuous label, "
               "e.g. the measured activity the call was made from" if values.size <= 2 else
               "raise data.quantile so that D_off spans at least two label values, or use a finer label")
        raise ValueError(f"{d.source}: every D_off label is {y_off[0]:g} (y takes {values.size} distinct values "
                         f"over D_0: {shown}; {rule}), so the reward would learn a constant: {fix}")
    if values.size <= FEW_VALUES:
        log.warning("%s: y takes only %d distinct values over D_0 (%s); D_off holds %d of them", d.source,
                    values.size, shown, np.unique(y_off).size)


def summarize(d: Labelled, s: Splits) -> dict:
    """Row counts, the threshold, the best offline design and its percentile in the full data."""
    best = int(s.off[np.argmax(d.y[s.off])])
    return {
        "rows": {"D": len(d), "D_ora": int(s.ora.size), "D_0": int(s.zero.size), "D_off": int(s.off.size)},
        "quantile": s.quantile,
        "oracle_fraction": s.oracle_fraction,
        "threshold": s.threshold,
        "offline_rule": s.rule,
        **({} if s.scan_radius is None else {"scan_radius": s.scan_radius, "wild_type_row": s.wild_type,
                                              "wild_type": decode(d.codes[s.wild_type][None])[0]}),
        "best_offline_y": float(d.y[best]),
        "best_offline_row": best,
        "best_offline_percentile": float(100.0 * np.mean(d.y <= d.y[best])),
        "y_full": {"min": float(d.y.min()), "median": float(np.median(d.y)), "max": float(d.y.max())},
        "y_off": {"min": float(d.y[s.off].min()), "median": float(np.median(d.y[s.off])),
                  "max": float(d.y[s.off].max())},
    }

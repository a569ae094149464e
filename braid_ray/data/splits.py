"""The paper's offline protocol (section 7.1): D -> D_ora | D_0, and D_off = rows of D_0 below a quantile of y."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from braid_ray.data.tables import Labelled

log = logging.getLogger(__name__)

MIN_LENGTH = 4  # letters: shorter sequences leave nothing to design
MIN_OFFLINE_ROWS = 20  # D_off rows the reward ensemble needs (held-out calibration rows and bootstrap resamples)
MIN_ORACLE_ROWS = 50  # D_ora rows an oracle trained on them needs (its own validation rows included)
FEW_VALUES = 10  # labels with at most this many distinct values are reported (screens, rounded scores)


@dataclass
class Splits:
    """Row indices into D for each split, plus the quantile threshold that defines D_off."""

    ora: np.ndarray  # D_ora: held out for the oracle (may be empty where an exact/pretrained oracle exists)
    zero: np.ndarray  # D_0 = D \\ D_ora
    off: np.ndarray  # D_off: rows of D_0 with y < threshold; the only labels the method ever sees
    threshold: float  # the q-quantile of y over D_0
    quantile: float
    oracle_fraction: float


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


def offline_splits(d: Labelled, oracle_fraction: float, quantile: float, seed: int) -> Splits:
    """Seeded random D_ora / D_0 split, then D_off = {i in D_0 : y_i < quantile_q(y over D_0)}."""
    if not 0.0 <= oracle_fraction < 1.0:
        raise ValueError(f"oracle_fraction must be in [0, 1), got {oracle_fraction}")
    n = len(d)
    perm = np.random.default_rng(seed).permutation(n)
    n_ora = int(round(oracle_fraction * n))
    ora, zero = np.sort(perm[:n_ora]), np.sort(perm[n_ora:])
    if zero.size == 0:
        raise ValueError(f"{d.source}: D_0 is empty with oracle_fraction={oracle_fraction} on {n} rows")
    below, threshold = below_quantile(d.y[zero], quantile, d.source, "D_0")
    off = zero[below]
    return Splits(ora, zero, off, threshold, quantile, oracle_fraction)


def check_offline(d: Labelled, s: Splits, trained_oracle: bool) -> None:
    """Degenerate data stops at the data stage, before any model trains, with what is wrong and what would fix
    it: sequences too short to design, too few rows for the reward ensemble (or for an oracle trained on
    D_ora), and offline labels that do not vary (a binary screen under any quantile: D_off then holds only its
    lower value, and the reward would learn a constant)."""
    if d.length < MIN_LENGTH:
        raise ValueError(f"{d.source}: the sequences have {d.length} letter(s), too short to design (at least "
                         f"{MIN_LENGTH}); check the sequence column and task.length")
    if s.off.size < MIN_OFFLINE_ROWS:
        raise ValueError(f"{d.source}: D_off has {s.off.size} row(s) (D_0 below its {s.quantile} quantile); the "
                         f"reward ensemble needs at least {MIN_OFFLINE_ROWS} (its held-out rows and bootstrap "
                         "resamples): give a larger table or raise data.quantile")
    if trained_oracle and s.ora.size < MIN_ORACLE_ROWS:
        raise ValueError(f"{d.source}: D_ora has {s.ora.size} row(s); an oracle trained on them needs at least "
                         f"{MIN_ORACLE_ROWS}: raise data.oracle_fraction or give a larger table")
    values = np.unique(d.y[s.zero])
    shown = ", ".join(f"{v:g}" for v in values[:FEW_VALUES])
    y_off = d.y[s.off]
    if np.ptp(y_off) == 0:
        fix = ("a label with two values (a hit call) cannot be ranked below a threshold: use a continuous label, "
               "e.g. the measured activity the call was made from" if values.size <= 2 else
               "raise data.quantile so that D_off spans at least two label values, or use a finer label")
        raise ValueError(f"{d.source}: every D_off label is {y_off[0]:g} (y takes {values.size} distinct values "
                         f"over D_0: {shown}; rows strictly below the {s.quantile} quantile, {s.threshold:g}, are "
                         f"offline), so the reward would learn a constant: {fix}")
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
        "best_offline_y": float(d.y[best]),
        "best_offline_row": best,
        "best_offline_percentile": float(100.0 * np.mean(d.y <= d.y[best])),
        "y_full": {"min": float(d.y.min()), "median": float(np.median(d.y)), "max": float(d.y.max())},
        "y_off": {"min": float(d.y[s.off].min()), "median": float(np.median(d.y[s.off])),
                  "max": float(d.y[s.off].max())},
    }

"""Validity per design, and the rule that marks a design hacked (invalid).

A design can score high under an oracle because it is good, or because it exploits the oracle: the utr_mrl
oracle (Optimus 5-Prime) scores poly-T (T x 50) at 8.78, above every offline design. These per-design
statistics tell the two apart, and ``ValidityRule`` turns them into one valid / invalid flag, so that a
hacked design counts as a failure and not as progress.

Per design (int codes (N, L) over 0=A, 1=C, 2=G, 3=T): the longest homopolymer run, the Shannon entropy of
its letter composition (bits, 0..2), the GC fraction and the fraction of each letter, the number of ATG
triplets (upstream start codons, uATGs: they lower translation from a 5'UTR; computed for every task,
meaningful for 5'UTRs), the Hamming distance to the nearest sequence of D (0 = the design is in D) and, from
``braid_ray.diffusion.likelihood``, the ELBO under the pretrained diffusion model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from braid_ray.data.encoding import ALPHABET
from braid_ray.eval.metrics import N_LETTERS, _check_same_length, _rows, check_codes, check_scores

# The rule (proposed config keys in parentheses; see ValidityRule for the reasoning).
# A homopolymer run this long is invalid whatever the data says (eval.hack_homopolymer): poly-T, the design
# the utr_mrl oracle overrates, has a run of L. In a uniform random 50-nt sequence a run >= 8 has chance ~0.2%.
HOMOPOLYMER_MIN_RUN = 8
# Each data-relative limit leaves this share of D's own rows on the invalid side (eval.hack_quantile): runs
# longer than D's 99th percentile, entropy and ELBO below D's 1st percentile.
VALIDITY_QUANTILE = 0.01
ELBO_DATA_ROWS = 1024  # rows of D (seeded sample) whose ELBO sets the ELBO limit (eval.hack_elbo_rows)

NN_QUERY_BLOCK = 2048  # designs per block of the nearest-neighbour search
NN_REFERENCE_BLOCK = 4096  # reference rows per block (a block's match counts: 2048 x 4096 float32 = 32 MB)

PER_DESIGN = ["homopolymer", "entropy", "gc", "frac_A", "frac_C", "frac_G", "frac_T", "uatg", "nn_distance"]


# ------------------------------------------------------------------------------------------------
# Per-design statistics


def longest_homopolymer(codes: np.ndarray) -> np.ndarray:
    """Length of the longest run of one letter in each design (N,) int, 1..L."""
    codes = check_codes(codes)
    run = np.ones(len(codes), dtype=np.int64)
    best = run.copy()
    for j in range(1, codes.shape[1]):
        run = np.where(codes[:, j] == codes[:, j - 1], run + 1, 1)
        np.maximum(best, run, out=best)
    return best


def letter_fractions(codes: np.ndarray) -> np.ndarray:
    """Fraction of A, C, G, T in each design (N, 4), rows summing to 1."""
    codes = check_codes(codes)
    return np.stack([np.count_nonzero(codes == a, axis=1) for a in range(N_LETTERS)], 1) / codes.shape[1]


def composition_entropy(codes: np.ndarray) -> np.ndarray:
    """Shannon entropy of each design's letter composition (N,) in bits: 0 for a homopolymer, 2 when the four
    letters are equally frequent (order-free: ACGTACGT... scores 2 too, which is what the homopolymer rule and
    the ELBO are for)."""
    p = letter_fractions(codes)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(1)


def gc_fraction(codes: np.ndarray) -> np.ndarray:
    """Fraction of C and G in each design (N,)."""
    p = letter_fractions(codes)
    return p[:, 1] + p[:, 2]


def motif_count(codes: np.ndarray, motif: str) -> np.ndarray:
    """Occurrences of ``motif`` (letters of ACGT, overlapping ones counted) in each design (N,) int."""
    codes = check_codes(codes)
    if not motif or any(ch not in ALPHABET for ch in motif.upper()):
        raise ValueError(f"motif: expected a non-empty string over {ALPHABET}, got {motif!r}")
    k, n_windows = len(motif), codes.shape[1] - len(motif) + 1
    if n_windows <= 0:
        return np.zeros(len(codes), dtype=np.int64)
    hit = np.ones((len(codes), n_windows), dtype=bool)
    for j, ch in enumerate(motif.upper()):
        hit &= codes[:, j:j + n_windows] == ALPHABET.index(ch)
    return hit.sum(1).astype(np.int64)


def uatg_count(codes: np.ndarray) -> np.ndarray:
    """ATG occurrences in each design (N,): upstream start codons, for 5'UTRs."""
    return motif_count(codes, "ATG")


def nearest_hamming(codes: np.ndarray, reference_codes: np.ndarray) -> np.ndarray:
    """Hamming distance (N,) int from each design (N, L) to its nearest row of the reference (N_ref, L); 0 = the
    design is in the reference.

    Designs found verbatim are settled by hashing; the others by blocks of one-hot matrix products
    (matches = onehot(x) . onehot(y), exact in float32 for L < 2**22), so a 65k x 640 search of 50-mers is one
    BLAS pass over the reference, and memory stays at one block pair.
    """
    codes, reference = check_codes(codes), check_codes(reference_codes, "reference_codes")
    _check_same_length(codes, reference)
    n, length = codes.shape
    dist = np.zeros(n, dtype=np.int64)
    todo = np.flatnonzero(~np.isin(_rows(codes), _rows(reference)))
    if todo.size == 0:
        return dist
    eye = np.eye(N_LETTERS, dtype=np.float32)
    best = np.zeros(todo.size, dtype=np.float32)  # most matching positions so far
    queries = [eye[codes[todo[i:i + NN_QUERY_BLOCK]]].reshape(-1, N_LETTERS * length)
               for i in range(0, todo.size, NN_QUERY_BLOCK)]
    for r in range(0, len(reference), NN_REFERENCE_BLOCK):
        block = eye[reference[r:r + NN_REFERENCE_BLOCK]].reshape(-1, N_LETTERS * length).T  # (4L, B)
        for q, query in enumerate(queries):
            part = best[q * NN_QUERY_BLOCK:q * NN_QUERY_BLOCK + len(query)]
            np.maximum(part, (query @ block).max(1), out=part)
    dist[todo] = length - np.rint(best).astype(np.int64)
    return dist


def design_statistics(codes_by_name: dict[str, np.ndarray], reference_codes: np.ndarray,
                      elbo: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every per-design statistic (``PER_DESIGN``, plus ``elbo`` when a function codes -> ELBO (N,) is given)
    for each named set of designs: {name: {statistic: (N_name,)}}. The nearest-neighbour search against the
    reference (D) runs once over all designs together."""
    if not codes_by_name:
        raise ValueError("codes_by_name: expected at least one set of designs, got none")
    checked = {name: check_codes(c, f"codes_by_name[{name!r}]") for name, c in codes_by_name.items()}
    reference = check_codes(reference_codes, "reference_codes")
    nn = nearest_hamming(np.concatenate(list(checked.values())), reference)
    out, start = {}, 0
    for name, codes in checked.items():
        p = letter_fractions(codes)
        stats = {"homopolymer": longest_homopolymer(codes), "entropy": composition_entropy(codes),
                 "gc": p[:, 1] + p[:, 2], **{f"frac_{a}": p[:, i] for i, a in enumerate(ALPHABET)},
                 "uatg": uatg_count(codes), "nn_distance": nn[start:start + len(codes)]}
        if elbo is not None:
            stats["elbo"] = np.asarray(elbo(codes), dtype=np.float64)
        out[name], start = stats, start + len(codes)
    return out


# ------------------------------------------------------------------------------------------------
# The rule


@dataclass(frozen=True)
class ValidityRule:
    """A design is invalid (hacked) if any of:

    - its longest homopolymer run >= ``homopolymer_run`` = max(HOMOPOLYMER_MIN_RUN, 1 + D's 99th percentile of
      the longest run). The fixed 8 catches poly-T at any L >= 8 and flags ~0.2% of uniform random 50-mers;
      the data term keeps the rule from flagging what the data itself is made of (genomic DHS sequences carry
      poly-A runs longer than 8) and, for short sequences, replaces a scaled-down fixed limit: a run of 4
      occurs in ~6% of all 8-mers, so max(4, L // 6) would call 6% of TFBind8's own table hacked.
    - its composition entropy < ``min_entropy_bits`` = D's 1st percentile (low-complexity designs: poly-T,
      mostly-T, two-letter repeats);
    - its ELBO under the pretrained model < ``min_elbo_nats`` = the 1st percentile over a sample of D (a design
      the generator that was trained on D finds less likely than 99% of D: off the data manifold, whatever
      the cause). None disables this part (no ELBO available).

    By construction each data-relative part flags about ``quantile`` of D's own rows (fewer when values tie),
    so D itself is about 97-99% valid: the Offline rows of the results table show the level to compare with.
    """

    homopolymer_run: int
    min_entropy_bits: float
    min_elbo_nats: float | None
    quantile: float

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, stats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(valid (N,) bool, reasons (N,) str) for one set of designs' statistics (``design_statistics``);
        a reason names each failed part, comma-separated ("homopolymer,entropy"), "" when valid."""
        checks = {"homopolymer": np.asarray(stats["homopolymer"]) >= self.homopolymer_run,
                  "entropy": np.asarray(stats["entropy"]) < self.min_entropy_bits}
        if self.min_elbo_nats is not None:
            if "elbo" not in stats:
                raise ValueError("stats: the rule has an ELBO limit but the statistics have no 'elbo'")
            checks["elbo"] = np.asarray(stats["elbo"]) < self.min_elbo_nats
        failed = np.stack(list(checks.values()), 1)
        names = list(checks)
        reasons = np.array([",".join(names[j] for j in np.flatnonzero(row)) for row in failed], dtype=object)
        return ~failed.any(1), reasons

    def describe(self, length: int) -> str:
        parts = [f"longest homopolymer >= {self.homopolymer_run}"
                 + ("" if self.homopolymer_run <= length else f" (never, at L = {length})"),
                 f"composition entropy < {self.min_entropy_bits:.3g} bits"]
        if self.min_elbo_nats is not None:
            parts.append(f"ELBO under the pretrained model < {self.min_elbo_nats:.4g} nats")
        return "; ".join(parts)


def validity_rule(reference_codes: np.ndarray, reference_elbo: np.ndarray | None = None, *,
                  quantile: float = VALIDITY_QUANTILE, min_run: int = HOMOPOLYMER_MIN_RUN) -> ValidityRule:
    """The rule's limits from the data D (N_ref, L) and, optionally, the ELBO (M,) of a sample of D."""
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile: expected a small tail share in (0, 0.5), got {quantile}")
    if min_run < 2:
        raise ValueError(f"min_run: expected a homopolymer run of at least 2, got {min_run}")
    reference = check_codes(reference_codes, "reference_codes")
    runs = longest_homopolymer(reference)
    run_limit = max(min_run, int(np.quantile(runs, 1 - quantile, method="higher")) + 1)
    min_entropy = float(np.quantile(composition_entropy(reference), quantile))
    min_elbo = None
    if reference_elbo is not None:
        min_elbo = float(np.quantile(check_scores(reference_elbo, "reference_elbo"), quantile))
    return ValidityRule(run_limit, min_entropy, min_elbo, quantile)


# ------------------------------------------------------------------------------------------------
# Per method


def validity_metrics(stats: dict[str, np.ndarray], valid: np.ndarray, scores: np.ndarray, best_offline: float,
                     worst_offline: float, *, uatg: bool = False) -> dict:
    """The validity columns of one method's row in the results table.

    ``valid_share``; ``median_valid``, the median oracle score over valid designs (NaN if none);
    ``median_penalized``, the median over ALL designs with every invalid one scored ``worst_offline`` (the
    worst oracle score in D_off: a hacked design is a failure, and a method cannot raise this number by
    hacking, nor by emitting a few good valid designs among many hacked ones); ``above_best_valid``, the share
    of all designs that are valid and score strictly above ``best_offline``; then the medians of
    homopolymer, entropy, gc, nn_distance and elbo, and with ``uatg`` the mean uATG count.
    """
    scores, valid = check_scores(scores), np.asarray(valid, dtype=bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid has shape {valid.shape} but scores has {scores.shape}; expected one flag per design")
    out = {"valid_share": float(valid.mean()),
           "median_valid": float(np.median(scores[valid])) if valid.any() else float("nan"),
           "median_penalized": float(np.median(np.where(valid, scores, worst_offline))),
           "above_best_valid": float(np.mean(valid & (scores > best_offline)))}
    for column in ("homopolymer", "entropy", "gc", "nn_distance", "elbo"):
        out[column] = float(np.median(stats[column])) if column in stats else float("nan")
    if uatg:
        out["uatg"] = float(np.mean(stats["uatg"]))
    return out

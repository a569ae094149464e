"""Metrics of one method's designs: oracle scores, validity (k-mer statistics), diversity, novelty.

Designs are int codes (N, L) over 0=A, 1=C, 2=G, 3=T (``braid_ray.data.encoding``); scores are the oracle's
float scores (N,). Every function validates its input and raises a ValueError that names the argument.
"""

from __future__ import annotations

import numpy as np

from braid_ray.eval.stats import pearson

N_LETTERS = 4
MAX_K = 12  # 4**12 = 16.8M frequencies; larger k has no use for validity
# The 3-mer reference is the measured top 0.1% of D by y, as in DRAKES (eval.kmer_top_fraction), with at least
# this many rows (eval.kmer_top_min_rows) so that a small table still gives a usable profile.
KMER_TOP_FRACTION = 0.001
KMER_TOP_MIN_ROWS = 10


def check_codes(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    """Validate int codes (N, L) with N, L >= 1 and values in 0..3; return them as contiguous int8."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"{name}: expected int codes of shape (N, L), got an array of shape {codes.shape}")
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one design of length >= 1, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{name}: expected integer codes 0..3 (0=A, 1=C, 2=G, 3=T), got dtype {codes.dtype}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= N_LETTERS:
        raise ValueError(f"{name}: codes must lie in 0..3 (0=A, 1=C, 2=G, 3=T), got values in {lo}..{hi}")
    return np.ascontiguousarray(codes, dtype=np.int8)


def check_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Validate a non-empty, finite float vector (N,); return it as float64."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{name}: expected a non-empty vector of shape (N,), got shape {scores.shape}")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} of {scores.size} scores are not finite "
                         f"(first at index {int(np.argmax(bad))})")
    return scores


def _check_same_length(codes: np.ndarray, reference: np.ndarray) -> None:
    if codes.shape[1] != reference.shape[1]:
        raise ValueError(f"codes have length {codes.shape[1]} but reference_codes have length "
                         f"{reference.shape[1]}; designs and the reference must be sequences of one task")


def _rows(codes: np.ndarray) -> np.ndarray:
    """int8 codes (N, L) -> (N,) opaque byte strings, one per row, for exact matching with np.isin/np.unique."""
    return codes.view(np.dtype((np.void, codes.shape[1]))).ravel()


# ------------------------------------------------------------------------------------------------
# Scores


def score_table(scores: np.ndarray, best_offline: float) -> dict:
    """Summary of oracle scores (N,): median, mean, p90, max, frac_above_best, n.

    ``frac_above_best`` is the fraction of designs scoring strictly above ``best_offline``, the oracle score
    of the best design in D_off (the paper's bar for "better than the data").
    """
    scores = check_scores(scores)
    if not np.isfinite(best_offline):
        raise ValueError(f"best_offline: expected a finite score, got {best_offline!r}")
    return {"n": int(scores.size), "median": float(np.median(scores)), "mean": float(scores.mean()),
            "p90": float(np.percentile(scores, 90)), "max": float(scores.max()),
            "frac_above_best": float(np.mean(scores > best_offline))}


# ------------------------------------------------------------------------------------------------
# Validity: k-mer statistics


def kmer_frequencies(codes: np.ndarray, k: int = 3) -> np.ndarray:
    """Normalised k-mer frequencies (4**k,) over all N * (L - k + 1) windows of codes (N, L).

    Entry i is the k-mer whose base-4 digits are i, first letter most significant (index 0 = AAA,
    1 = AAC, ..., 63 = TTT for k = 3), the order of ``braid_ray.data.encoding.to_index``.
    """
    codes = check_codes(codes)
    if not 1 <= k <= min(codes.shape[1], MAX_K):
        raise ValueError(f"k: expected 1 <= k <= min(L, {MAX_K}) = {min(codes.shape[1], MAX_K)}, got {k}")
    n_windows = codes.shape[1] - k + 1
    counts = np.zeros(N_LETTERS ** k, dtype=np.int64)
    rows = max(1, 2 ** 22 // n_windows)  # blocks of ~4M windows bound the memory on large tables
    for start in range(0, len(codes), rows):
        block = codes[start:start + rows]
        index = np.zeros((len(block), n_windows), dtype=np.int32)  # k-mer id of each window
        for j in range(k):
            index = index * N_LETTERS + block[:, j:j + n_windows]
        counts += np.bincount(index.ravel(), minlength=N_LETTERS ** k)
    return counts / counts.sum()


def kmer_pearson(codes: np.ndarray, reference_codes: np.ndarray, k: int = 3) -> float:
    """Pearson correlation between the k-mer frequencies of designs (N, L) and of a reference (N_ref, L).

    Near 1: the designs look like the reference in k-mer composition. NaN if either frequency vector is
    constant (every k-mer equally frequent), where the correlation is undefined.
    """
    codes, reference = check_codes(codes), check_codes(reference_codes, "reference_codes")
    _check_same_length(codes, reference)
    return pearson(kmer_frequencies(codes, k), kmer_frequencies(reference, k))


def top_rows(y: np.ndarray, fraction: float, min_rows: int = 1) -> np.ndarray:
    """Indices of the top ceil(fraction * N) rows of y (N,) (at least ``min_rows``, at most N), best first; ties
    keep the table's order."""
    y = check_scores(y, "y")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a share of the rows in (0, 1], got {fraction}")
    n = min(len(y), max(int(np.ceil(fraction * len(y) - 1e-9)), min_rows, 1))
    return np.argsort(-y, kind="stable")[:n]


# ------------------------------------------------------------------------------------------------
# Diversity and novelty


def mean_pairwise_hamming(codes: np.ndarray, max_pairs: int | None = None, seed: int = 0) -> float:
    """Mean Hamming distance over all unordered pairs of designs (N, L), in positions (0..L; divide by L
    for a fraction). NaN for a single design.

    Exact by default, for any N, in O(N L): at each position the number of differing pairs is
    (N**2 - sum over letters of count**2) / 2, so no pair is ever formed. With ``max_pairs`` set and
    N (N - 1) / 2 > max_pairs, an estimate from ``max_pairs`` pairs drawn uniformly with replacement
    (seeded by ``seed``) instead.
    """
    codes = check_codes(codes)
    n, length = codes.shape
    if n < 2:
        return float("nan")
    n_pairs = n * (n - 1) // 2
    if max_pairs is None or n_pairs <= max_pairs:
        counts = np.stack([np.count_nonzero(codes == a, axis=0) for a in range(N_LETTERS)])  # (4, L)
        counts = counts.astype(np.float64)
        differing = (n * n - (counts ** 2).sum(0)) / 2  # (L,) differing pairs per position
        return float(differing.sum() / n_pairs)
    if max_pairs < 1:
        raise ValueError(f"max_pairs: expected a positive number of pairs or None (exact), got {max_pairs}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=max_pairs)
    j = (i + rng.integers(1, n, size=max_pairs)) % n  # j != i, uniform over the other designs
    chunk = max(1, 2 ** 22 // length)  # ~4M compared letters at a time
    total = sum(int(np.count_nonzero(codes[i[s:s + chunk]] != codes[j[s:s + chunk]]))
                for s in range(0, max_pairs, chunk))
    return total / max_pairs


def novelty(codes: np.ndarray, reference_codes: np.ndarray) -> float:
    """Fraction of designs (N, L) whose exact sequence is not in the reference (N_ref, L).

    Counted per design, so repeated designs count as often as they occur.
    """
    codes, reference = check_codes(codes), check_codes(reference_codes, "reference_codes")
    _check_same_length(codes, reference)
    return float(np.mean(~np.isin(_rows(codes), _rows(reference))))


def distinct(codes: np.ndarray) -> int:
    """Number of distinct sequences among designs (N, L)."""
    return int(np.unique(_rows(check_codes(codes))).size)


def method_metrics(codes: np.ndarray, scores: np.ndarray, best_offline: float, reference_codes: np.ndarray,
                   *, k: int = 3, novelty_reference: np.ndarray | None = None,
                   max_pairs: int | None = None) -> dict:
    """Every metric of one method: ``score_table`` plus kmer_pearson, diversity, novelty, distinct.

    codes (N, L) and their oracle scores (N,). ``reference_codes`` (N_ref, L) is the k-mer reference and,
    unless ``novelty_reference`` is given, the novelty reference too. ``diversity`` is the mean pairwise
    Hamming distance in positions.
    """
    codes, scores = check_codes(codes), check_scores(scores)
    if len(codes) != len(scores):
        raise ValueError(f"codes has {len(codes)} designs but scores has {len(scores)}; expected one score "
                         "per design")
    novelty_reference = reference_codes if novelty_reference is None else novelty_reference
    return {**score_table(scores, best_offline),
            "kmer_pearson": kmer_pearson(codes, reference_codes, k),
            "diversity": mean_pairwise_hamming(codes, max_pairs),
            "novelty": novelty(codes, novelty_reference),
            "distinct": distinct(codes)}

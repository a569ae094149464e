"""Sequence encoding: letters <-> integer codes (0=A, 1=C, 2=G, 3=T) <-> one-hot (N, L, 4).

Validation names the source and the line (or row) of the first bad sequence, so a user can fix the
table rather than guess.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

ALPHABET = "ACGT"
_COMPLEMENT = np.array([3, 2, 1, 0], dtype=np.int8)  # A<->T, C<->G

# Byte -> code; -1 marks a letter outside the alphabet. Lower case is accepted; RNA U reads as T.
_CODE = np.full(256, -1, dtype=np.int8)
for _i, _c in enumerate(ALPHABET):
    _CODE[ord(_c)] = _CODE[ord(_c.lower())] = _i
_CODE[ord("U")] = _CODE[ord("u")] = 3


@dataclass(frozen=True)
class Locator:
    """Where row i of a parsed table came from: ``where(i)`` -> "file.csv line 12"."""

    source: str
    first_line: int | None = 2  # file line of row 0 (after a one-line header); None: say "row i"

    def where(self, i: int) -> str:
        if self.first_line is None:
            return f"{self.source} row {i}"
        return f"{self.source} line {self.first_line + i}"


def encode(
    sequences: Sequence[str],
    locator: Locator,
    length: int | None = None,
    invalid_letters: str = "error",
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and encode sequences.

    Returns ``(codes, keep)``: int8 codes of shape (N_kept, L) and the boolean mask (N,) of kept rows.
    Rows with letters outside ACGT/U raise, or are dropped with a warning if ``invalid_letters="drop"``.
    All kept rows must have one length: ``length`` if given, else the length most rows have.
    """
    n = len(sequences)
    if n == 0:
        raise ValueError(f"{locator.source}: no sequences")
    seqs = [s if isinstance(s, str) else "" for s in sequences]
    for i, s in enumerate(sequences):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"{locator.where(i)}: empty or missing sequence")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
    flat = np.frombuffer("".join(seqs).encode("latin-1", errors="replace"), dtype=np.uint8)
    codes_flat = _CODE[flat]
    bad_flat = codes_flat < 0
    keep = np.ones(n, dtype=bool)
    if bad_flat.any():
        row_of = np.repeat(np.arange(n), lengths)
        bad_rows = np.unique(row_of[bad_flat])
        first = int(bad_rows[0])
        offset = int(np.argmax(bad_flat[row_of == first]))
        letter = seqs[first][offset]
        msg = (f"{locator.where(first)}: letter {letter!r} at position {offset + 1} is not one of A, C, G, T "
               f"(U is read as T); {len(bad_rows)} row(s) affected")
        if invalid_letters != "drop":
            raise ValueError(msg + ". Fix the table or set task.invalid_letters=drop to drop such rows.")
        log.warning("%s; dropping them (task.invalid_letters=drop)", msg)
        keep[bad_rows] = False
        if not keep.any():
            raise ValueError(f"{locator.source}: every row has letters outside ACGT")
    expected = length if length is not None else int(np.bincount(lengths[keep]).argmax())
    wrong = np.flatnonzero(keep & (lengths != expected))
    if wrong.size:
        i = int(wrong[0])
        why = "task.length" if length is not None else "the length most rows have"
        raise ValueError(f"{locator.where(i)}: sequence has length {lengths[i]}, expected {expected} ({why}); "
                         f"{wrong.size} row(s) differ. All designs of a task must have one length.")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[keep]
    idx = starts[:, None] + np.arange(expected)[None, :]
    return codes_flat[idx].astype(np.int8), keep


def decode(codes: np.ndarray) -> list[str]:
    """int codes (N, L) -> list of N strings over ACGT."""
    letters = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)[np.asarray(codes, dtype=np.int64)]
    return [row.tobytes().decode() for row in letters]


def encode_strings(sequences: Sequence[str]) -> np.ndarray:
    """Encode sequences already known to be valid and of one length (e.g. read back from a run directory)."""
    codes, _ = encode(sequences, Locator("sequences", None))
    return codes


def one_hot(codes: np.ndarray) -> np.ndarray:
    """int codes (N, L) -> float32 one-hot (N, L, 4)."""
    return np.eye(len(ALPHABET), dtype=np.float32)[np.asarray(codes, dtype=np.int64)]


def reverse_complement(codes: np.ndarray) -> np.ndarray:
    """int codes (N, L) -> reverse complements (N, L)."""
    return _COMPLEMENT[np.asarray(codes)[:, ::-1]]


def to_index(codes: np.ndarray) -> np.ndarray:
    """int codes (N, L) -> base-4 integer per sequence (first letter most significant), for exact tables."""
    codes = np.asarray(codes, dtype=np.int64)
    weights = 4 ** np.arange(codes.shape[1] - 1, -1, -1, dtype=np.int64)
    return codes @ weights


def from_index(index: np.ndarray, length: int) -> np.ndarray:
    """The inverse of to_index: base-4 integers (N,) -> int codes (N, length)."""
    weights = 4 ** np.arange(length - 1, -1, -1, dtype=np.int64)
    return (np.asarray(index, dtype=np.int64)[:, None] // weights) % 4

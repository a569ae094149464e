"""A k-mer ridge regression oracle trained on D_ora: a second opinion of another model family.

Where the task's oracle shares data with the reward (Optimus 5-Prime was trained on the whole Sample et al.
2019 library, D_off included) or shares its family (a CNN, like the reward's members), its blind spots are
the reward's. This oracle is linear in k-mer features, so it has none of a CNN's inductive biases:

    y_hat(x) = b + sum_j w_j * clip(phi_j(x), lo_j, hi_j)

phi(x): positional k-mers (one indicator per position and k-mer, k in ``positional``) and k-mer counts
anywhere in the sequence (k in ``counts``). Columns are centred and scaled to unit variance over the
training rows, and ``w`` is the ridge solution ``(Phi^T Phi + lambda n I)^-1 Phi^T z`` on the z-scored
label, found by conjugate gradients on sparse products (no n x p or p x p matrix is formed). lambda is
chosen on a tuning share of the training rows, then the model is refitted on all of them; Pearson and
Spearman are reported on D_ora rows it never trained on. At scoring time each count is clipped to the range
seen in training, so the model does not extrapolate a count linearly past what it saw (a homopolymer's
50 T's count as the most T's of any training row).

Deterministic given the seed: the splits are seeded and the fit has no random step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from braid_ray.eval.stats import pearson, spearman

log = logging.getLogger(__name__)

# Defaults until the config has keys for them (see the report of issue 12).
POSITIONAL = (1, 2, 3)  # k of positional k-mer indicators
COUNTS = (1, 2, 3, 4, 5, 6)  # k of position-free k-mer counts
LAMBDAS = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03)  # ridge strengths tried, largest first (warm starts); x n_rows
TOL = 1e-5  # conjugate gradients stop at ||residual|| / ||Phi^T z|| below this
MAX_ITER = 400  # conjugate-gradient iterations per lambda
CHUNK = 1024  # rows per chunk when scoring (a chunk's dense counts: CHUNK x 5,460 floats for L = 50)


def kmer_ids(codes: np.ndarray, k: int) -> np.ndarray:
    """(N, L) codes -> (N, L - k + 1) base-4 index of the k-mer starting at each position."""
    codes = np.asarray(codes, dtype=np.int64)
    n, length = codes.shape
    ids = np.zeros((n, length - k + 1), np.int64)
    for j in range(k):
        ids = ids * 4 + codes[:, j:length - k + 1 + j]
    return ids


@dataclass(frozen=True)
class KmerFeatures:
    """The column layout: positional blocks (position-major), then count blocks, each 4^k k-mers wide."""

    length: int
    positional: tuple[int, ...] = POSITIONAL
    counts: tuple[int, ...] = COUNTS

    def __post_init__(self) -> None:
        for k in (*self.positional, *self.counts):
            if not 1 <= k <= min(self.length, 8):
                raise ValueError(f"k-mer size {k} must be in 1..{min(self.length, 8)} for sequences of "
                                 f"length {self.length}")

    def blocks(self) -> list[tuple[str, int, int, int]]:
        """(kind, k, first column, width) per block."""
        out, offset = [], 0
        for k in self.positional:
            width = (self.length - k + 1) * 4**k
            out.append(("positional", k, offset, width))
            offset += width
        for k in self.counts:
            out.append(("count", k, offset, 4**k))
            offset += 4**k
        return out

    @property
    def width(self) -> int:
        return sum(b[3] for b in self.blocks())

    def columns(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) codes -> (N, m) int32 column of every feature occurrence; a row's phi is the column counts."""
        out = []
        for kind, k, offset, _ in self.blocks():
            ids = kmer_ids(codes, k)
            if kind == "positional":
                ids = ids + np.arange(ids.shape[1]) * 4**k
            out.append((ids + offset).astype(np.int32))
        return np.concatenate(out, 1)

    def dense(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) codes -> (N, p) float64 feature matrix phi, for a few rows (tests)."""
        cols = self.columns(codes)
        n = cols.shape[0]
        flat = (np.arange(n)[:, None] * self.width + cols).ravel()
        return np.bincount(flat, minlength=n * self.width).reshape(n, self.width).astype(np.float64)


def default_features(length: int) -> KmerFeatures:
    """``POSITIONAL`` and ``COUNTS``, without the k-mers longer than the sequences."""
    return KmerFeatures(length, tuple(k for k in POSITIONAL if k <= length), tuple(k for k in COUNTS if k <= length))


class _Design:
    """Phi over some rows, kept as the column of each occurrence. Phi v and Phi^T u are embedding-bag sums in
    float32; the solver's vectors and dot products stay in float64."""

    def __init__(self, cols: np.ndarray, width: int):
        self.n, self.m = cols.shape
        self.width = width
        self.cols = torch.from_numpy(cols)
        flat = cols.ravel()
        # Phi^T as bags of row ids per column; a stable sort by column keeps each bag's rows ascending.
        order = np.argsort(flat, kind="stable")
        self.rows = torch.from_numpy((order // self.m).astype(np.int32))
        counts = np.bincount(flat, minlength=width)
        self.offsets = torch.from_numpy(np.r_[0, np.cumsum(counts)[:-1]].astype(np.int32))
        self.col_sum = counts.astype(np.float64)  # sum_i phi_ij

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """Phi v: (p,) -> (n,)."""
        w = torch.from_numpy(v.astype(np.float32))[:, None]
        return F.embedding_bag(self.cols, w, mode="sum")[:, 0].double().numpy()

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        """Phi^T u: (n,) -> (p,)."""
        w = torch.from_numpy(u.astype(np.float32))[:, None]
        return F.embedding_bag(self.rows, w, self.offsets, mode="sum")[:, 0].double().numpy()


def _count_stats(cols: np.ndarray, features: KmerFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column over the rows: sum of phi_ij^2, min and max of phi_ij (0 where a row lacks the k-mer)."""
    n, p = cols.shape[0], features.width
    sq, lo, hi = np.zeros(p), np.zeros(p), np.zeros(p)
    start = 0
    for kind, k, offset, width in features.blocks():
        m = features.length - k + 1
        block = cols[:, start:start + m].astype(np.int64) - offset
        start += m
        if kind == "positional":  # indicators: phi^2 = phi, range [0, 1]
            occurrences = np.bincount(block.ravel(), minlength=width)
            sq[offset:offset + width] = occurrences
            hi[offset:offset + width] = occurrences > 0
            lo[offset:offset + width] = occurrences == n
            continue
        key, count = np.unique((np.arange(n)[:, None] * width + block).ravel(), return_counts=True)
        col = key % width
        sq[offset:offset + width] = np.bincount(col, weights=count.astype(np.float64) ** 2, minlength=width)
        block_hi = np.zeros(width)
        np.maximum.at(block_hi, col, count)
        block_lo = np.full(width, np.inf)
        np.minimum.at(block_lo, col, count)
        present = np.bincount(col, minlength=width)
        block_lo[present < n] = 0.0  # some row has none of it
        hi[offset:offset + width], lo[offset:offset + width] = block_hi, block_lo
    return sq, lo, hi


def _ridge_cg(design: _Design, mu: np.ndarray, scale: np.ndarray, z: np.ndarray, lam: float,
              theta: np.ndarray) -> tuple[np.ndarray, int]:
    """Solve (Phi_s^T Phi_s + lam n I) theta = Phi_s^T z by conjugate gradients from ``theta``.

    Phi_s = (Phi - 1 mu^T) diag(1/scale): the centred, unit-variance design, applied without forming it.
    """
    n = design.n

    def a_times(v: np.ndarray) -> np.ndarray:
        w = v / scale
        u = design.matvec(w) - mu @ w
        return (design.rmatvec(u) - mu * u.sum()) / scale + lam * n * v

    b = (design.rmatvec(z) - mu * z.sum()) / scale
    r = b - a_times(theta)
    d, rs, stop = r.copy(), r @ r, (TOL * np.linalg.norm(b)) ** 2
    for it in range(1, MAX_ITER + 1):
        if rs <= stop:
            return theta, it - 1
        ad = a_times(d)
        step = rs / (d @ ad)
        theta = theta + step * d
        r = r - step * ad
        rs_new = r @ r
        d = r + (rs_new / rs) * d
        rs = rs_new
    log.warning("k-mer ridge: conjugate gradients stopped at %d iterations (lambda %g), relative residual %.2g",
                MAX_ITER, lam, np.sqrt(rs) / np.linalg.norm(b))
    return theta, MAX_ITER


def heldout_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(val, train) positions in 0..n-1: the same seeded split as the trained CNN oracle uses on D_ora."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return perm[:n_val], perm[n_val:]


class KmerRidgeOracle:
    """y_hat(x) = intercept + weight . clip(phi(x), clip_lo, clip_hi); see the module docstring."""

    name = "kmer_ridge"

    def __init__(self, features: KmerFeatures, weight: np.ndarray, intercept: float, clip_lo: np.ndarray,
                 clip_hi: np.ndarray, info: dict):
        self.features, self.weight, self.intercept = features, weight, intercept
        self.clip_lo, self.clip_hi, self.info = clip_lo, clip_hi, info
        self._count_blocks = [b for b in features.blocks() if b[0] == "count"]
        self._count_cols = np.concatenate([np.arange(o, o + w) for _, _, o, w in self._count_blocks] or
                                          [np.zeros(0, np.int64)])
        self._positional_cols = sum(features.length - k + 1 for k in features.positional)

    def score(self, codes: np.ndarray, clip: bool = True) -> np.ndarray:
        """int codes (N, L) -> (N,) predicted label; ``clip=False`` lets counts extrapolate (for diagnosis)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.features.length:
            raise ValueError(f"the k-mer ridge oracle scores sequences of length {self.features.length}, "
                             f"got codes of shape {codes.shape}")
        out = np.empty(len(codes))
        for i in range(0, len(codes), CHUNK):
            out[i:i + CHUNK] = self._score_chunk(codes[i:i + CHUNK], clip)
        return out

    def out_of_range(self, codes: np.ndarray) -> np.ndarray:
        """(N,) number of count features outside the range seen in training: 0 = within the data's support."""
        codes, lo, hi = np.asarray(codes), self.clip_lo[self._count_cols], self.clip_hi[self._count_cols]
        out = np.zeros(len(codes), np.int64)
        for i in range(0, len(codes), CHUNK):
            phi = self._counts(codes[i:i + CHUNK])
            out[i:i + CHUNK] = ((phi < lo) | (phi > hi)).sum(1)
        return out

    def _counts(self, codes: np.ndarray) -> np.ndarray:
        n, parts = len(codes), []
        for _, k, _, width in self._count_blocks:
            ids = kmer_ids(codes, k)
            flat = (np.arange(n)[:, None] * width + ids).ravel()
            parts.append(np.bincount(flat, minlength=n * width).reshape(n, width))
        return np.concatenate(parts, 1).astype(np.float64) if parts else np.zeros((n, 0))

    def _score_chunk(self, codes: np.ndarray, clip: bool) -> np.ndarray:
        cols = self.features.columns(codes)
        if not clip or not self._count_blocks:
            return self.intercept + self.weight[cols].sum(1)
        count_cols = self._count_cols
        phi = np.clip(self._counts(codes), self.clip_lo[count_cols], self.clip_hi[count_cols])
        positional = cols[:, :self._positional_cols]
        return self.intercept + self.weight[positional].sum(1) + phi @ self.weight[count_cols]

    @classmethod
    def fit(cls, codes: np.ndarray, y: np.ndarray, seed: int, val_fraction: float = 0.1,
            features: KmerFeatures | None = None, lambdas: tuple[float, ...] = LAMBDAS) -> KmerRidgeOracle:
        """Fit on (codes, y) (D_ora): lambda chosen on a tuning share of the training rows, then refitted on
        all training rows; Pearson and Spearman reported on the held-out ``val_fraction``."""
        codes, y = np.asarray(codes), np.asarray(y, np.float64)
        if len(codes) < 20:
            raise ValueError(f"D_ora has {len(codes)} rows; the k-mer ridge oracle needs at least 20 "
                             "(raise data.oracle_fraction)")
        if not lambdas or min(lambdas) <= 0:
            raise ValueError(f"ridge lambdas must be positive, got {lambdas}")
        start = time.perf_counter()
        features = features or KmerFeatures(codes.shape[1])
        val, tr = heldout_split(len(codes), val_fraction, seed)
        tune_pos, fit_pos = heldout_split(len(tr), val_fraction, seed + 1)
        cols = features.columns(codes[tr])
        y_mean, y_std = float(y[tr].mean()), float(y[tr].std() or 1.0)
        z = (y[tr] - y_mean) / y_std
        sq, lo, hi = _count_stats(cols, features)
        design = _Design(cols, features.width)
        mu = design.col_sum / len(tr)
        var = sq / len(tr) - mu**2
        scale = np.where(var > 1e-12, np.sqrt(np.maximum(var, 1e-12)), 1.0)  # constant columns get weight 0

        # lambda on the tuning rows, fitting the others (same centring and scale: lambda's meaning is kept).
        fit_design = _Design(cols[fit_pos], features.width)
        tune_cols = cols[tune_pos]
        theta, path = np.zeros(features.width), []
        for lam in sorted(lambdas, reverse=True):
            theta, iters = _ridge_cg(fit_design, mu, scale, z[fit_pos], lam, theta)
            w = theta / scale
            r = pearson(w[tune_cols].sum(1), z[tune_pos])
            path.append({"lambda": lam, "tune_pearson": r, "cg_iterations": iters})
            log.info("k-mer ridge: lambda %g, tuning Pearson %.4f (%d CG iterations)", lam, r, iters)
        best = max(path, key=lambda p: (np.nan_to_num(p["tune_pearson"], nan=-2.0), p["lambda"]))
        del fit_design
        theta, iters = _ridge_cg(design, mu, scale, z, best["lambda"], theta)
        w = theta / scale
        weight = w * y_std
        intercept = float(y_mean - y_std * (mu @ w))
        oracle = cls(features, weight, intercept, lo, hi, {})
        pred = oracle.score(codes[val])
        oracle.info = {
            "kind": cls.name, "exact": False, "family": "linear (ridge) on k-mer features",
            "heldout_pearson": pearson(pred, y[val]), "heldout_spearman": spearman(pred, y[val]),
            "heldout_rows": int(val.size), "train_rows": int(tr.size), "tune_rows": int(tune_pos.size),
            "lambda": best["lambda"], "lambda_path": path, "final_cg_iterations": iters,
            "features": {"length": features.length, "positional": list(features.positional),
                         "counts": list(features.counts)}, "width": features.width, "val_fraction": val_fraction,
            "seed": seed, "fit_seconds": round(time.perf_counter() - start, 1),
            "data_sha256": data_digest(codes, y),
            "note": "k-mer ridge regression trained on D_ora only (the method never sees D_ora); "
                    "another model family than the reward's CNN members"}
        log.info("k-mer ridge oracle: held-out Pearson %.4f, Spearman %.4f on %d D_ora rows (%.0f s)",
                 oracle.info["heldout_pearson"], oracle.info["heldout_spearman"], val.size,
                 oracle.info["fit_seconds"])
        return oracle

    def to_bytes(self) -> bytes:
        """Weights as safetensors; the settings travel in ``info`` (JSON) beside them."""
        return save_safetensors({"weight": torch.from_numpy(self.weight),
                                 "intercept": torch.tensor([self.intercept], dtype=torch.float64),
                                 "clip_lo": torch.from_numpy(self.clip_lo), "clip_hi": torch.from_numpy(self.clip_hi)})

    @classmethod
    def from_bytes(cls, data: bytes, info: dict) -> KmerRidgeOracle:
        f = info["features"]
        features = KmerFeatures(int(f["length"]), tuple(f["positional"]), tuple(f["counts"]))
        t = load_safetensors(data)
        if t["weight"].shape != (features.width,):
            raise ValueError(f"k-mer ridge weights have shape {tuple(t['weight'].shape)}, expected "
                             f"({features.width},) for {features}")
        return cls(features, t["weight"].numpy(), float(t["intercept"][0]), t["clip_lo"].numpy(),
                   t["clip_hi"].numpy(), info)


def data_digest(codes: np.ndarray, y: np.ndarray) -> str:
    """A hash of the training table, so a cached model is reused only for the same rows."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(codes, dtype=np.int8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def settings_digest(features: KmerFeatures, lambdas: tuple[float, ...], val_fraction: float, seed: int) -> str:
    return hashlib.sha256(json.dumps([asdict(features), list(lambdas), val_fraction, seed, TOL, MAX_ITER]
                                     ).encode()).hexdigest()[:16]

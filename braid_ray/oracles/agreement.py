"""Two oracles side by side: the task's (primary) and an independent one (secondary), and how far they agree.

A pretrained evaluator trained on the same library as D shares the reward's blind spots (Optimus 5-Prime
scores poly-T above every offline design). A second oracle of another model family, trained only on D_ora,
is reported beside it; where the two disagree on a method's designs, the method has found something at
least one of them does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from braid_ray.eval.stats import pearson, spearman
from braid_ray.oracles.base import Oracle


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Agreement of two oracles' scores (N,) of the same N designs: Pearson, Spearman, means, medians.

    Correlations are NaN when either side is constant (e.g. one distinct design) or N < 2.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"agreement needs two score vectors of one length, got shapes {a.shape} and {b.shape}")
    n = int(a.size)
    ok = n >= 2
    return {"n": n,
            "pearson": pearson(a, b) if ok else float("nan"),
            "spearman": spearman(a, b) if ok else float("nan"),
            "primary_mean": float(a.mean()) if n else float("nan"),
            "secondary_mean": float(b.mean()) if n else float("nan"),
            "primary_median": float(np.median(a)) if n else float("nan"),
            "secondary_median": float(np.median(b)) if n else float("nan")}


def method_agreement(primary: dict[str, np.ndarray], secondary: dict[str, np.ndarray],
                     best_offline: tuple[float, float] | None = None) -> dict:
    """Per method (same keys in both dicts), the two oracles' agreement on its designs; then over all designs
    pooled, and whether the two oracles rank the methods alike (Spearman of the per-method medians).

    ``best_offline``: the best offline design's score under (primary, secondary); adds each method's share
    of designs above it under each oracle, and under both at once.
    """
    if set(primary) != set(secondary):
        raise ValueError(f"the two oracles scored different methods: {sorted(primary)} vs {sorted(secondary)}")
    methods = {}
    for name in primary:
        row = agreement(primary[name], secondary[name])
        if best_offline is not None:
            above_p = np.asarray(primary[name]) > best_offline[0]
            above_s = np.asarray(secondary[name]) > best_offline[1]
            row.update({"primary_frac_above_best": float(above_p.mean()) if above_p.size else float("nan"),
                        "secondary_frac_above_best": float(above_s.mean()) if above_s.size else float("nan"),
                        "both_frac_above_best": float((above_p & above_s).mean()) if above_p.size else float("nan")})
        methods[name] = row
    names = list(primary)
    pooled = agreement(np.concatenate([np.asarray(primary[m], np.float64) for m in names] or [np.zeros(0)]),
                       np.concatenate([np.asarray(secondary[m], np.float64) for m in names] or [np.zeros(0)]))
    med_p = np.array([methods[m]["primary_median"] for m in names])
    med_s = np.array([methods[m]["secondary_median"] for m in names])
    ranking = spearman(med_p, med_s) if len(names) >= 2 else float("nan")
    return {"methods": methods, "pooled": pooled, "method_ranking_spearman": ranking,
            "order_primary": [names[i] for i in np.argsort(-med_p, kind="stable")],
            "order_secondary": [names[i] for i in np.argsort(-med_s, kind="stable")]}


@dataclass
class OracleSet:
    """The primary oracle (the task's) and an optional secondary (independent) one.

    An OracleSet is itself an Oracle: ``name``, ``info`` and ``score`` are the primary's, so code that scores
    with one oracle keeps working; ``score_all``, ``compare`` and ``summary`` add the secondary.
    ``heldout``: both oracles against the measured y on D_ora's validation rows (rows neither the method
    nor the secondary trained on), and their agreement there; empty without a secondary.
    """

    primary: Oracle
    secondary: Oracle | None = None
    heldout: dict = field(default_factory=dict)
    why_no_secondary: str | None = None

    @property
    def name(self) -> str:
        return self.primary.name

    @property
    def info(self) -> dict:
        return self.primary.info

    def score(self, codes: np.ndarray) -> np.ndarray:
        """The primary oracle's scores (N,)."""
        return self.primary.score(codes)

    def score_all(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        """{"primary": (N,), "secondary": (N,)} (no "secondary" key without one)."""
        out = {"primary": self.primary.score(codes)}
        if self.secondary is not None:
            out["secondary"] = self.secondary.score(codes)
        return out

    def compare(self, codes: dict[str, np.ndarray], best_offline_codes: np.ndarray | None = None) -> dict:
        """Score every method's designs {method: codes (N_m, L)} with both oracles.

        Returns {"primary": {method: (N_m,)}, "secondary": {method: (N_m,)} or None, "best_offline":
        {"primary": float, "secondary": float or None} or None (the max over ``best_offline_codes``, e.g.
        D_off), "agreement": ``method_agreement(...)`` or None without a secondary}.
        """
        primary = {name: self.primary.score(c) for name, c in codes.items()}
        secondary = ({name: self.secondary.score(c) for name, c in codes.items()}
                     if self.secondary is not None else None)
        best = None
        if best_offline_codes is not None and len(best_offline_codes):
            best = {"primary": float(self.primary.score(best_offline_codes).max()),
                    "secondary": (float(self.secondary.score(best_offline_codes).max())
                                  if self.secondary is not None else None)}
        agree = None
        if secondary is not None:
            agree = method_agreement(primary, secondary,
                                     (best["primary"], best["secondary"]) if best is not None else None)
        return {"primary": primary, "secondary": secondary, "best_offline": best, "agreement": agree}

    @property
    def summary(self) -> dict:
        """Both oracles' info, their held-out agreement, and why there is no secondary (when there is none)."""
        return {"primary": self.primary.info,
                "secondary": self.secondary.info if self.secondary is not None else None,
                "why_no_secondary": self.why_no_secondary,
                "heldout_agreement": self.heldout}


def heldout_agreement(oracles: OracleSet, codes: np.ndarray, y: np.ndarray) -> dict:
    """Both oracles against the measurements y of ``codes`` (held-out rows), and against each other."""
    s = oracles.score_all(codes)
    out = {"rows": int(len(y)),
           "primary_pearson": pearson(s["primary"], y), "primary_spearman": spearman(s["primary"], y)}
    if "secondary" in s:
        out.update({"secondary_pearson": pearson(s["secondary"], y),
                    "secondary_spearman": spearman(s["secondary"], y),
                    "oracles_pearson": pearson(s["primary"], s["secondary"]),
                    "oracles_spearman": spearman(s["primary"], s["secondary"])})
    return out

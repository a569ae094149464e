"""An exact oracle: the measured value of every possible design, looked up by its base-4 index."""

from __future__ import annotations

import numpy as np

from braid_ray.data.encoding import to_index
from braid_ray.data.tables import Labelled


class ExactTableOracle:
    name = "table"

    def __init__(self, d: Labelled):
        n = 4**d.length
        index = to_index(d.codes)
        if np.unique(index).size != n:
            raise ValueError(f"{d.source}: an exact oracle needs all {n} sequences of length {d.length}, "
                             f"the table has {np.unique(index).size}")
        self.values = np.empty(n, dtype=np.float64)
        self.values[index] = d.y
        self.length = d.length
        self.info = {"kind": self.name, "exact": True, "source": d.source,
                     "note": "measured value of every design; no model error"}

    def score(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.length:
            raise ValueError(f"expected codes of shape (N, {self.length}), got {codes.shape}")
        return self.values[to_index(codes)]

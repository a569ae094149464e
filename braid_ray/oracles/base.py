"""The oracle interface: a scorer of hard sequences that the method never sees during training."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Oracle(Protocol):
    name: str
    info: dict  # what it is and how good it is (e.g. held-out Pearson), reported next to its scores

    def score(self, codes: np.ndarray) -> np.ndarray:
        """int codes (N, L) over ACGT -> (N,) oracle values, on the task's label scale."""
        ...

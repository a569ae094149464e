from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def enhancer_table() -> Path:
    return FIXTURES / "enhancers_small.csv.gz"

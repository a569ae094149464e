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


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole test run (2 CPUs; workers ask for fractions of a CPU)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from braid_ray.distributed.cluster import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()

"""Joining (or starting) a Ray cluster, and checking a trainer's resources before it can hang."""

from __future__ import annotations

import logging
import os

import ray
from ray.train import ScalingConfig

from braid_ray.config import RayConfig

log = logging.getLogger(__name__)

# Every Ray worker gets one BLAS/OpenMP thread per CPU it was given (set again in the worker from its config).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init(cfg: RayConfig) -> None:
    """Connect to ``cfg.address`` or the job's cluster (RAY_ADDRESS), else start a local Ray on this machine."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=os.environ.get("BRAID_RAY_QUIET", "") != "1", include_dashboard=False if address is None else None,
             runtime_env={"env_vars": WORKER_ENV})
    log.info("ray: %s, resources %s", "joined " + address if address else "started a local cluster",
             {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})


def scaling(cfg: RayConfig, num_workers: int) -> ScalingConfig:
    """A ScalingConfig for ``num_workers`` workers, checked against the cluster so it fails instead of waiting."""
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    sc = ScalingConfig(num_workers=num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)
    have = ray.cluster_resources()
    autoscaling = os.environ.get("BRAID_AUTOSCALING", "") == "1"
    for key, need in sc.total_resources.items():
        if key in ("CPU", "GPU") and have.get(key, 0) < need and not autoscaling:
            raise ValueError(
                f"ray: {num_workers} workers x {resources} need {key}={need:g}, the cluster has {have.get(key, 0):g}; "
                "lower ray.num_workers or ray.cpus_per_worker (or set BRAID_AUTOSCALING=1 on an autoscaling cluster)")
    return sc


def threads_per_worker(cfg: RayConfig) -> int:
    return max(1, int(cfg.cpus_per_worker))

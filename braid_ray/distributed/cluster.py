"""Joining (or starting) a Ray cluster, and checking a trainer's resources before it can hang."""

from __future__ import annotations

import json
import logging
import os

import ray
from ray.train import ScalingConfig

from braid_ray.config import RayConfig

log = logging.getLogger(__name__)

# Every Ray worker gets one BLAS/OpenMP thread per CPU it was given (set again in the worker from its config).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# Set by `ray job submit` in the driver's environment: the job's runtime env, as JSON.
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict[str, str]:
    """WORKER_ENV minus the variables a submitted job's runtime env already sets.

    Ray refuses to start a job's driver whose ``ray.init(runtime_env=...)`` sets an env var that the job's own
    runtime env (e.g. cluster/runtime_env.yaml) also sets, even to the same value.
    """
    job = json.loads(os.environ.get(JOB_CONFIG_VAR) or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in WORKER_ENV.items() if k not in taken}


def init(cfg: RayConfig, ray_logs: bool = False) -> None:
    """Join ``cfg.address`` or the job's cluster (RAY_ADDRESS, set by `ray job submit`), else start a local Ray.

    Ray's own INFO lines on the driver are hidden unless ``ray_logs`` (``tracking.ray_logs``); the workers'
    braid_ray lines (rank 0's progress) still reach the console."""
    logging.getLogger("ray").setLevel(logging.INFO if ray_logs else logging.WARNING)
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise ValueError(f"ray address {address} is a dashboard (Jobs API) address, which `ray job submit --address` "
                         "takes; a script joins a cluster by its GCS address (host:6379) or 'auto'. Submit this "
                         "script with `ray job submit`, or unset RAY_ADDRESS to run on a local Ray")
    # The dashboard is left on (Ray's default with ray[default]): Ray Train's PlacementGroupCleaner asks the
    # state API, served by the dashboard, whether the controller is alive, and without it logs a warning
    # every 2 s for the whole run and cannot free a dead run's placement group.
    # Ray's own Python loggers (Train's "Reporting training result ...", resource requests) log at WARNING in
    # every worker and actor of this job unless asked for; braid_ray's loggers keep INFO (cli.setup_logging,
    # workers.quiet_logging), so rank 0's progress still reaches the console.
    ray.init(address=address, runtime_env={"env_vars": worker_env()},
             logging_config=ray.LoggingConfig(encoding="TEXT", log_level="INFO" if ray_logs else "WARNING"))
    log.info("ray: %s, resources %s", "joined " + address if address else "started a local cluster",
             {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})


def scaling(cfg: RayConfig, num_workers: int, one_node: bool = False) -> ScalingConfig:
    """A ScalingConfig for ``num_workers`` workers, checked against the cluster so it fails instead of waiting.

    ``one_node``: all workers on one node (STRICT_PACK), for ZeRO over NVLink (the 8-GPU SD preset); the
    autoscaler then starts a node type that holds them all instead of spreading them over 1-GPU nodes.

    On an autoscaling cluster (``ray.autoscaling=true``, as the jobs of cluster/ pass it) the worker nodes may not
    exist yet, so the check is left to the autoscaler and Ray Train.
    """
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    sc = ScalingConfig(num_workers=num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                       placement_strategy="STRICT_PACK" if one_node else "PACK")
    if cfg.autoscaling:
        log.info("ray: %d workers x %s requested from the autoscaler", num_workers, resources)
        return sc
    have = ray.cluster_resources()
    for key, need in sc.total_resources.items():
        if key in ("CPU", "GPU") and have.get(key, 0) < need:
            raise ValueError(
                f"ray: {num_workers} workers x {resources} need {key}={need:g}, the cluster has {have.get(key, 0):g}; "
                "lower ray.num_workers or ray.cpus_per_worker (or set ray.autoscaling=true on an autoscaling cluster)")
    return sc


def threads_per_worker(cfg: RayConfig) -> int:
    return max(1, int(cfg.cpus_per_worker))

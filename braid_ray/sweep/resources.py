"""What one sweep trial asks Ray for, and how many trials run at once: pure functions of the sweep and the
cluster's resources (no Ray; ``braid_ray.distributed.tune`` reads the cluster and calls them).

A trial's footprint is its own process (``tune.with_resources``: sweep.cpus_per_trial, and for in-process
trials sweep.gpus_per_trial) plus, with ``ray.num_workers > 0``, its Ray Train workers, which Tune does not
count. The number of concurrent trials is how many footprints the cluster holds at its largest: its current
resources on a fixed cluster; on an autoscaling cluster (ray.autoscaling=true) the fully scaled-up size, from
``sweep.cluster_max`` or, where Ray publishes it, the autoscaler's own config. ``sweep.max_concurrent_trials``
may lower that number, never raise it past what fits.
"""

from __future__ import annotations

import logging
import math

from braid_ray.config import ConfigError
from braid_ray.sweep.spec import Sweep

log = logging.getLogger(__name__)

TRIAL_DRIVER_CPUS = 0.1  # a trial that only drives Train workers (Tune rejects 0 CPUs)


def trial_cpus(sweep: Sweep) -> float:
    """CPUs of a trial's own process: sweep.cpus_per_trial, else 1 in-trial and 0.1 when it drives Train workers."""
    if sweep.settings.cpus_per_trial is not None:
        return sweep.settings.cpus_per_trial
    return 1.0 if sweep.base.ray.num_workers == 0 else TRIAL_DRIVER_CPUS


def trial_threads(sweep: Sweep) -> int:
    """Torch threads of a trial's process: one per whole CPU of an in-process trial, 1 for a Train driver."""
    return max(1, int(trial_cpus(sweep))) if sweep.base.ray.num_workers == 0 else 1


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """What ``tune.with_resources`` reserves for a trial's process: ``{"cpu": ...}``, plus ``"gpu"`` (a fraction
    shares one GPU between trials) when sweep.gpus_per_trial > 0."""
    out = {"cpu": trial_cpus(sweep)}
    if sweep.settings.gpus_per_trial > 0:
        out["gpu"] = sweep.settings.gpus_per_trial
    return out


def trial_device(sweep: Sweep) -> str:
    """``run.device`` of an in-process trial: ``cuda`` when it reserves a GPU, else ``cpu``.

    Never ``auto``: since Ray 2.49 a trial without GPUs still sees every GPU of its node (Ray no longer empties
    CUDA_VISIBLE_DEVICES), and would train on one that Ray gave to another trial."""
    return "cuda" if sweep.settings.gpus_per_trial > 0 else "cpu"


def trial_footprint(sweep: Sweep) -> dict[str, float]:
    """Everything one trial occupies, in Ray's resource names: its process and its Train workers."""
    r = sweep.base.ray
    workers = r.num_workers if r.num_workers > 0 else 0
    need = {"CPU": trial_cpus(sweep) + workers * r.cpus_per_worker}
    gpus = sweep.settings.gpus_per_trial + (float(workers) if r.use_gpu else 0.0)
    if gpus > 0:
        need["GPU"] = gpus
    return need


def capacity(sweep: Sweep, current: dict[str, float],
             reported_max: dict[str, float] | None) -> tuple[dict[str, float] | None, str]:
    """(the resources to plan the sweep for, where they come from); None when an autoscaling cluster's maximum
    is unknown.

    ``current``: ``ray.cluster_resources()``. ``reported_max``: the autoscaler's maximum where Ray publishes it.
    On a fixed cluster (``ray.autoscaling=false``) the current resources are its maximum and sweep.cluster_max is
    not used."""
    stated = {k: v for k, v in (("CPU", sweep.settings.cluster_max.cpus), ("GPU", sweep.settings.cluster_max.gpus))
              if v is not None}
    if not sweep.base.ray.autoscaling:
        if stated:
            log.info("sweep.cluster_max %s is not used: without ray.autoscaling=true the cluster's current "
                     "resources %s are its maximum", stated, current)
        return dict(current), "the cluster"
    if not stated and not reported_max:
        return None, "the autoscaling cluster at its largest"
    found = dict(current)
    for key, value in (reported_max or {}).items():
        found[key] = max(found.get(key, 0.0), float(value))
    found |= stated
    source = "sweep.cluster_max" if stated else "the autoscaler's config"
    return found, f"the autoscaling cluster at its largest ({source})"


def concurrency(sweep: Sweep, current: dict[str, float], reported_max: dict[str, float] | None = None) -> int:
    """How many trials may run at once: as many footprints as the cluster holds at its largest (see
    ``capacity``), or sweep.max_concurrent_trials when lower. Raises ConfigError when one trial does not fit,
    or when an autoscaling cluster's maximum is unknown and the sweep file does not say how many to run."""
    need = trial_footprint(sweep)
    wanted = sweep.settings.max_concurrent_trials
    cap, where = capacity(sweep, current, reported_max)
    if cap is None:
        if wanted is None:
            raise ConfigError(
                "sweep: on an autoscaling cluster (ray.autoscaling=true) the number of concurrent trials comes from "
                "the cluster's largest size, which this Ray does not report (the cluster now has "
                f"{_short(current)}). Set sweep.cluster_max.cpus (and sweep.cluster_max.gpus) to the resources of "
                "the fully scaled-up cluster, or sweep.max_concurrent_trials")
        log.info("sweep: %d trials at once (sweep.max_concurrent_trials), each %s, on an autoscaling cluster",
                 wanted, need)
        return wanted
    fits = min(math.floor(cap.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    if fits < 1:
        raise ConfigError(
            f"sweep: one trial needs {need} (sweep.cpus_per_trial and sweep.gpus_per_trial, plus ray.num_workers x "
            f"ray.cpus_per_worker and one GPU per worker with ray.use_gpu); {where} has {_short(cap)}. Lower them"
            + ("" if sweep.base.ray.autoscaling else
               ", or set ray.autoscaling=true and sweep.cluster_max on an autoscaling cluster"))
    if wanted is None:
        return fits
    if wanted > fits:
        log.warning("sweep.max_concurrent_trials=%d: %s fits %d trials of %s at once; running %d", wanted, where,
                    fits, need, fits)
        return fits
    return wanted


def _short(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU")}

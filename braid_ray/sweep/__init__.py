"""Hyper-parameter sweeps of BRAID fine-tuning: a search space over the config's dotted keys, one fine-tuning
run per trial from shared upstream models, selection on an explicit oracle budget, resumable (Ray Tune)."""

from braid_ray.sweep.spec import Sweep, SweepSettings, load_sweep, trial_config

__all__ = ["Sweep", "SweepSettings", "load_sweep", "trial_config"]

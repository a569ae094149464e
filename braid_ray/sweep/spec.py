"""The sweep file: a base config, a search space over its dotted keys, and the sweep's own settings.

    base:                        # the one config every trial starts from
      config: ../tfbind8.yaml    # a preset, relative to the sweep file (null = the defaults)
      overrides: [finetune.methods=[braid_bonus], ray.num_workers=0]   # key=value, as on the command line
    search:                      # dotted key -> {grid | choice: [values]} or {uniform | loguniform | randint: [lo, hi]}
      finetune.alpha: {grid: [1.0e-4, 1.0e-3]}
      finetune.strength: {grid: [0.5, 2.0]}
      run.seed: {grid: [0, 1]}
    sweep: {name: tfbind8_alpha, storage: runs/sweeps, search_alg: grid, oracle_budget: 64}

Trials share one reward model and one pretrained diffusion model, trained once from the base config before
the sweep, so only ``finetune.*`` keys and ``run.seed`` may vary. ``run.seed`` in a trial seeds fine-tuning
only (the trainable's initial weights, the sampler's noise and the final samples); the data split, the reward
ensemble and the pretrained model always come from the base config's ``run.seed``.

Everything is checked before any work: unknown keys (with a did-you-mean), keys that would need a new
upstream model, every grid value and range end (through the config's own validation), and the settings.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from braid_ray.config import (Config, ConfigError, build_dataclass, from_dict, load_config, parse_override,
                              read_yaml, without_later_defaults)

SEED_KEY = "run.seed"
# selection metric: the mean oracle score of a trial's final samples (the budget), each design the validity rule
# calls invalid counted as the worst offline design (braid_ray/evaluate.py, selection_scores)
METRIC = "oracle_score"
OBJECTIVE = "objective"  # early-stopping metric: the conservative fine-tuning objective, never the oracle
TOP_LEVEL = ("base", "search", "sweep")
# Search-space kinds: how many values each takes ("list" = one or more).
KINDS = {"grid": "list", "choice": "list", "uniform": "range", "loguniform": "range", "randint": "range"}


@dataclass
class AshaSettings:
    enabled: bool = False  # stop trials whose conservative objective lags at a rung (every trial reports each step)
    grace_period: int = 10  # optimizer steps every trial runs before it can be stopped
    reduction_factor: float = 2.0  # at each rung, keep the best 1/reduction_factor of the trials


@dataclass
class ClusterMax:
    """The fully scaled-up cluster, on an autoscaling cluster (ray.autoscaling=true), for the number of concurrent
    trials. Ray 2.60 has no public API for it and its open-source autoscaler does not publish its config, so the
    sweep file states it; null = ask Ray (used where the platform publishes it). Not used on a fixed cluster."""

    cpus: float | None = None  # CPUs of all nodes at their maximum count (head included)
    gpus: float | None = None  # GPUs of all nodes at their maximum count


@dataclass
class SweepSettings:
    name: str | None = None  # experiment name; results under <storage>/<name>/; null = the sweep file's name
    storage: str = "runs/sweeps"  # local directory, or s3:// / gs:// URI (Ray's storage_path)
    search_alg: Literal["grid", "random", "optuna"] = "grid"  # optuna needs the optional extra (pip install optuna)
    num_samples: int = 1  # grid: repeats of the grid; random/optuna: configurations drawn (x each grid point)
    oracle_budget: int = 64  # oracle queries per trial, spent on its final samples only
    max_concurrent_trials: int | None = None  # null = as many as the cluster's CPUs (and GPUs) fit at its largest
    cpus_per_trial: float | None = None  # CPUs of a trial's process; null = 1 in-trial, 0.1 if it drives Train workers
    # GPUs of an in-process trial's process (ray.num_workers=0); a fraction (0.25) shares one GPU between trials.
    # > 0: the trial fine-tunes on cuda; 0: on the CPU. Train workers get theirs from ray.use_gpu instead.
    gpus_per_trial: float = 0.0
    cluster_max: ClusterMax = field(default_factory=ClusterMax)
    asha: AshaSettings = field(default_factory=AshaSettings)


@dataclass
class Sweep:
    """A validated sweep: the base config, the search space (normalised values) and the settings."""

    base: Config
    search: dict[str, dict[str, list]]  # dotted key -> {kind: values}
    settings: SweepSettings
    source: str  # the sweep file, for the record

    @property
    def name(self) -> str:
        assert self.settings.name is not None
        return self.settings.name

    @property
    def method(self) -> str:
        return self.base.finetune.methods[0]

    def record(self) -> dict[str, Any]:
        """What identifies the sweep: a resumed run must have the same record."""
        settings = dataclasses.asdict(self.settings)
        for key in ("max_concurrent_trials", "cpus_per_trial", "cluster_max"):  # resources may change between runs
            settings.pop(key)
        if settings["gpus_per_trial"] == 0:  # recorded only when trials run on a GPU (their checkpoints stay there)
            settings.pop("gpus_per_trial")
        base = self.base.to_dict()
        base["run"].pop("debug")  # how a failure is shown, not what the trials compute
        base["finetune"] = without_later_defaults(base["finetune"])  # sweeps recorded before such a key still resume
        return {"base": base, "search": self.search, "settings": settings}

    def grid_size(self) -> int | None:
        """Number of trials of a grid search (None for random / Optuna, where num_samples draws)."""
        if self.settings.search_alg != "grid":
            return None
        return math.prod(len(s["grid"]) for s in self.search.values()) * self.settings.num_samples


# -------------------------------------------------------------------------------------------------
# Dotted keys


def config_keys() -> list[str]:
    """Every leaf key of the config as a dotted name (``finetune.alpha``, ``run.seed``, ...)."""
    def leaves(tree: dict, prefix: str) -> list[str]:
        out = []
        for k, v in tree.items():
            out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
        return out

    return leaves(Config().to_dict(), "")


def searchable(key: str) -> bool:
    return key.startswith("finetune.") or key == SEED_KEY


def get_dotted(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The config of one trial: ``base`` (a ``Config.to_dict()``) with dotted ``params`` set, validated."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(tree, key, value)
    cfg = from_dict(tree)
    if cfg.domain != "sequence":
        raise ConfigError(
            f"domain: got {cfg.domain!r}; sweeps fine-tune sequences only (domain: sequence). The image pipeline has "
            "no entry point yet that fine-tunes one trial's configuration outside the run directory's "
            "finetune/<method> stage, reporting every step, and scores exactly sweep.oracle_budget of its images "
            "with the oracle. Run launch/finetune.py --config <image preset> finetune.alpha=... per configuration")
    if cfg.finetune.monitor_queries > 0:
        raise ConfigError(f"finetune.monitor_queries: got {cfg.finetune.monitor_queries}; a sweep queries the oracle "
                          "only through its explicit budget (sweep.oracle_budget, on each trial's final samples): "
                          "set 0")
    if len(cfg.finetune.methods) != 1:
        raise ConfigError(f"finetune.methods: got {cfg.finetune.methods}, a sweep trial fine-tunes one method; "
                          "set e.g. finetune.methods=[braid_bonus] in base.overrides")
    return cfg


# -------------------------------------------------------------------------------------------------
# Loading and validation


def _unknown(kind: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown {kind} {key}{hint}; valid: {', '.join(valid)}")


def _check_search_key(key: str, keys: list[str]) -> None:
    if key not in keys:
        raise _unknown("search key", key, [k for k in keys if searchable(k)])
    if not searchable(key):
        raise ConfigError(f"search key {key}: trials share one reward and one pretrained model trained from the "
                          "base config before the sweep, so only finetune.* keys and run.seed can vary; set "
                          f"{key} in base.overrides (one sweep per reward or pretraining config)")


def _normalise(base: dict, key: str, value: Any) -> Any:
    """``value`` as the config stores it (e.g. YAML's string '1e-3' -> 0.001), or a ConfigError naming the key."""
    try:
        return get_dotted(trial_config(base, {key: value}).to_dict(), key)
    except ConfigError as e:
        raise ConfigError(f"search {key}: {e}") from None


def _search_space(tree: Any, base: dict, alg: str) -> dict[str, dict[str, list]]:
    if not isinstance(tree, dict) or not tree:
        raise ConfigError("search: expected a mapping of dotted config keys to {grid: [...]} (or choice, uniform, "
                          f"loguniform, randint), got {tree!r}")
    keys = config_keys()
    space: dict[str, dict[str, list]] = {}
    for key, spec in tree.items():
        key = str(key)
        _check_search_key(key, keys)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"search {key}: got {spec!r}, expected one of {{grid: [...]}}, {{choice: [...]}}, "
                              "{uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}; constant values "
                              "belong in base.overrides")
        (kind, values), = spec.items()
        if kind not in KINDS:
            raise _unknown(f"search kind for {key}:", str(kind), list(KINDS))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search {key}.{kind}: got {values!r}, expected a non-empty list")
        if KINDS[kind] == "range":
            if len(values) != 2:
                raise ConfigError(f"search {key}.{kind}: got {values!r}, expected [lo, hi]")
            lo, hi = (_normalise(base, key, v) for v in values)
            if kind == "randint":
                if not isinstance(lo, int) or isinstance(lo, bool):
                    raise ConfigError(f"search {key}.randint: {key} is not an integer key; use uniform")
                _normalise(base, key, hi - 1)  # Tune's randint excludes hi
            if not lo < hi:
                raise ConfigError(f"search {key}.{kind}: got [{lo}, {hi}], expected lo < hi")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"search {key}.loguniform: got lo={lo}, expected lo > 0 (or use uniform)")
            values = [lo, hi]
        else:
            values = [_normalise(base, key, v) for v in values]
        if alg == "grid" and kind != "grid":
            raise ConfigError(f"search {key}: {kind} draws values; use grid with sweep.search_alg=grid, or set "
                              "sweep.search_alg=random (or optuna)")
        if alg == "optuna" and kind == "grid":
            raise ConfigError(f"search {key}: Optuna proposes every value itself and cannot take a grid; use "
                              f"choice: {values} (or sweep.search_alg=grid / random)")
        space[key] = {kind: values}
    return space


def _settings(tree: Any, default_name: str) -> SweepSettings:
    settings = build_dataclass(SweepSettings, tree if tree is not None else {}, "sweep.")
    if settings.name is None:
        settings.name = default_name
    s = settings

    def check(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"sweep.{key}: got {get_dotted(dataclasses.asdict(s), key)!r}, expected {expected}")

    check(bool(s.name.strip()) and "/" not in s.name, "name", "a non-empty name without '/'")
    check(bool(s.storage.strip()), "storage", "a local directory or an s3:// / gs:// URI")
    check(s.num_samples >= 1, "num_samples", "an integer >= 1")
    check(s.oracle_budget >= 1, "oracle_budget", "an integer >= 1 (oracle queries per trial)")
    check(s.max_concurrent_trials is None or s.max_concurrent_trials >= 1, "max_concurrent_trials",
          "an integer >= 1, or null (as many as the cluster fits)")
    check(s.cpus_per_trial is None or s.cpus_per_trial > 0, "cpus_per_trial",
          "a positive CPU count (fractions are fine), or null")
    check(s.gpus_per_trial >= 0, "gpus_per_trial", "a GPU count >= 0 (0 = CPU trials; 0.25 = a quarter of a GPU)")
    check(s.cluster_max.cpus is None or s.cluster_max.cpus > 0, "cluster_max.cpus",
          "the fully scaled-up cluster's CPU count, or null")
    check(s.cluster_max.gpus is None or s.cluster_max.gpus >= 0, "cluster_max.gpus",
          "the fully scaled-up cluster's GPU count (>= 0), or null")
    check(s.asha.grace_period >= 1, "asha.grace_period", "an integer >= 1 (optimizer steps)")
    check(s.asha.reduction_factor > 1, "asha.reduction_factor", "a number > 1")
    if s.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search_alg=optuna needs the optuna package, which is an optional extra: "
                          "pip install 'braid-ray[optuna]' (or pip install optuna), or use grid / random")
    return settings


def _split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """``sweep.x=v`` -> the sweep settings; anything else is a config override (``finetune.steps=10``)."""
    settings: dict[str, Any] = {}
    config: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("sweep."):
            node = settings
            *parents, leaf = key.removeprefix("sweep.").split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        else:
            config.append(text)
    return settings, config


def _merge(tree: dict, extra: dict) -> dict:
    out = dict(tree)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _check_trial_device(base: Config, s: SweepSettings) -> None:
    """sweep.gpus_per_trial is for in-process trials, and decides their device (see resources.trial_device)."""
    workers = base.ray.num_workers
    if s.gpus_per_trial > 0 and workers > 0:
        raise ConfigError(f"sweep.gpus_per_trial: got {s.gpus_per_trial} with ray.num_workers={workers}; a trial "
                          "with Ray Train workers only drives them, and the workers get one GPU each from "
                          "ray.use_gpu=true. Set sweep.gpus_per_trial=0, or ray.num_workers=0 for in-process trials")
    if s.gpus_per_trial > 0 and base.run.device == "cpu":
        raise ConfigError(f"sweep.gpus_per_trial: got {s.gpus_per_trial} with run.device=cpu; a trial that reserves "
                          "a GPU fine-tunes on it. Set run.device=auto (or cuda), or sweep.gpus_per_trial=0")
    if s.gpus_per_trial == 0 and base.run.device == "cuda" and workers == 0:
        raise ConfigError("run.device: got 'cuda' with sweep.gpus_per_trial=0; an in-process trial uses a GPU only "
                          "when Ray reserves one for it. Set sweep.gpus_per_trial (e.g. 0.25 to share a GPU between "
                          "4 trials), or run.device=auto for CPU trials")


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and validate a sweep file; ``overrides`` are ``sweep.key=value`` settings or config ``key=value``s."""
    path = Path(path)
    tree = read_yaml(path)
    for key in tree:
        if key not in TOP_LEVEL:
            raise _unknown("top-level key", str(key), list(TOP_LEVEL))
    extra_settings, extra_config = _split_overrides(overrides)
    base_tree = tree.get("base") or {}
    if not isinstance(base_tree, dict):
        raise ConfigError(f"base: got {base_tree!r}, expected a mapping with config and overrides")
    for key in base_tree:
        if key not in ("config", "overrides"):
            raise _unknown("key", f"base.{key}", ["base.config", "base.overrides"])
    preset = base_tree.get("config")
    if preset is not None:
        preset = (path.parent / preset).resolve()
    base_overrides = base_tree.get("overrides") or []
    if not isinstance(base_overrides, list) or not all(isinstance(o, str) for o in base_overrides):
        raise ConfigError(f"base.overrides: got {base_overrides!r}, expected a list of key=value strings")
    base = load_config(preset, [*base_overrides, *extra_config])
    settings = _settings(_merge(tree.get("sweep") or {}, extra_settings), path.stem)
    if "://" not in base.run.dir:  # trials run in their own working directory: make the run dir absolute
        base.run.dir = str(Path(base.run.dir).expanduser().resolve())
    base_dict = base.to_dict()
    trial_config(base_dict, {})  # one method per trial
    search = _search_space(tree.get("search"), base_dict, settings.search_alg)
    _check_trial_device(base, settings)
    if settings.asha.enabled:
        if "finetune.steps" in search:
            raise ConfigError("sweep.asha: rungs are counted in finetune.steps, which must then be the same for "
                              "every trial; remove finetune.steps from search")
        if settings.asha.grace_period > base.finetune.steps:
            raise ConfigError(f"sweep.asha.grace_period: got {settings.asha.grace_period}, expected at most "
                              f"finetune.steps={base.finetune.steps}")
    return Sweep(base, search, settings, str(path))

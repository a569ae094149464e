"""What a sweep trial asks Ray for and how many run at once (pure: no Ray), and the settings' checks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from braid_ray.config import ConfigError
from braid_ray.sweep import load_sweep
from braid_ray.sweep.resources import concurrency, trial_device, trial_footprint, trial_resources, trial_threads
from tests.test_sweep import write_sweep

SEARCH = {"finetune.alpha": {"grid": [0.1, 1.0]}}


def sweep_with(tmp_path: Path, settings: dict | None = None, *overrides: str):
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "run", SEARCH, {"name": "s", **(settings or {})}, overrides)
    return load_sweep(path)


def test_in_process_trials_fit_by_cpus_and_the_setting_only_lowers_it(tmp_path: Path, caplog) -> None:
    sweep = sweep_with(tmp_path)
    assert trial_footprint(sweep) == {"CPU": 1.0} and trial_threads(sweep) == 1
    assert concurrency(sweep, {"CPU": 8.0, "memory": 1e9}) == 8
    assert concurrency(sweep_with(tmp_path, {"max_concurrent_trials": 3}), {"CPU": 8.0}) == 3
    with caplog.at_level(logging.WARNING):
        assert concurrency(sweep_with(tmp_path, {"max_concurrent_trials": 20}), {"CPU": 8.0}) == 8
    assert "sweep.max_concurrent_trials=20: the cluster fits 8 trials" in caplog.text
    assert trial_threads(sweep_with(tmp_path, {"cpus_per_trial": 2})) == 2


def test_train_trials_count_their_workers(tmp_path: Path) -> None:
    sweep = sweep_with(tmp_path, {}, "ray.num_workers=2", "ray.cpus_per_worker=0.5")
    assert trial_footprint(sweep) == {"CPU": pytest.approx(1.1)}  # the trial's 0.1 CPU + 2 x 0.5
    assert trial_resources(sweep) == {"cpu": 0.1}  # what Tune reserves; the workers reserve their own
    assert concurrency(sweep, {"CPU": 8.0}) == 7
    gpu = sweep_with(tmp_path, {}, "ray.num_workers=2", "ray.use_gpu=true")
    assert trial_footprint(gpu)["GPU"] == 2.0 and concurrency(gpu, {"CPU": 64.0, "GPU": 5.0}) == 2
    with pytest.raises(ConfigError, match=r"one trial needs \{'CPU': 1.1, 'GPU': 2.0\}.*the cluster has "
                                          r"\{'CPU': 64.0\}.*ray.autoscaling=true and sweep.cluster_max"):
        concurrency(gpu, {"CPU": 64.0})


AUTOSCALING = "ray.autoscaling=true"


def test_autoscaling_concurrency_comes_from_the_largest_cluster_not_the_current_one(tmp_path: Path) -> None:
    head_only = {"CPU": 4.0}  # an autoscaling cluster before any worker node started
    fixed = sweep_with(tmp_path, {"cluster_max": {"cpus": 64}}, "ray.num_workers=2", "ray.cpus_per_worker=1")
    assert concurrency(fixed, head_only) == 1  # on a fixed cluster the current resources are the maximum
    sweep = sweep_with(tmp_path, {"cluster_max": {"cpus": 64}}, "ray.num_workers=2", "ray.cpus_per_worker=1",
                       AUTOSCALING)
    assert concurrency(sweep, head_only) == 30  # 64 CPUs / (0.1 + 2 x 1)
    # The autoscaler's own config, where Ray publishes it; the sweep file's statement wins.
    published = sweep_with(tmp_path, {}, "ray.num_workers=2", "ray.cpus_per_worker=1", AUTOSCALING)
    assert concurrency(published, head_only, {"CPU": 32.0, "GPU": 4.0}) == 15
    assert concurrency(sweep, head_only, {"CPU": 32.0}) == 30
    capped = sweep_with(tmp_path, {"cluster_max": {"cpus": 64}, "max_concurrent_trials": 4}, "ray.num_workers=2",
                        AUTOSCALING)
    assert concurrency(capped, head_only) == 4
    # GPUs at the largest size: one worker GPU each, 8 GPUs -> 4 trials of 2 workers.
    gpus = sweep_with(tmp_path, {"cluster_max": {"cpus": 64, "gpus": 8}}, "ray.num_workers=2", "ray.use_gpu=true",
                      AUTOSCALING)
    assert concurrency(gpus, head_only) == 4

    unknown = sweep_with(tmp_path, {}, "ray.num_workers=2", AUTOSCALING)
    with pytest.raises(ConfigError, match=r"largest size, which this Ray does not report.*sweep.cluster_max.cpus"):
        concurrency(unknown, head_only, None)
    told = sweep_with(tmp_path, {"max_concurrent_trials": 6}, "ray.num_workers=2", AUTOSCALING)
    assert concurrency(told, head_only, None) == 6  # trusted: the cluster can grow
    too_big = sweep_with(tmp_path, {"cluster_max": {"cpus": 1}}, "ray.num_workers=2", AUTOSCALING)
    with pytest.raises(ConfigError, match=r"the autoscaling cluster at its largest \(sweep.cluster_max\) has "
                                          r"\{'CPU': 1.0\}"):
        concurrency(too_big, head_only)


def test_fractional_gpu_trials_share_a_gpu_and_train_on_cuda(tmp_path: Path) -> None:
    cpu = sweep_with(tmp_path)
    assert trial_resources(cpu) == {"cpu": 1.0} and trial_device(cpu) == "cpu"
    quarter = sweep_with(tmp_path, {"gpus_per_trial": 0.25})
    assert trial_resources(quarter) == {"cpu": 1.0, "gpu": 0.25} and trial_device(quarter) == "cuda"
    assert trial_footprint(quarter) == {"CPU": 1.0, "GPU": 0.25}
    assert concurrency(quarter, {"CPU": 16.0, "GPU": 1.0}) == 4  # four trials on one GPU
    assert concurrency(quarter, {"CPU": 3.0, "GPU": 1.0}) == 3
    with pytest.raises(ConfigError, match="one trial needs"):
        concurrency(quarter, {"CPU": 16.0})
    # A trial's device is part of the sweep (its checkpoints live there); CPU sweeps keep their old record.
    assert "gpus_per_trial" not in cpu.record()["settings"] and quarter.record()["settings"]["gpus_per_trial"] == 0.25
    assert "cluster_max" not in quarter.record()["settings"]


BAD = [
    ({"gpus_per_trial": -1}, (), "sweep.gpus_per_trial: got -1.0, expected a GPU count >= 0"),
    ({"gpus_per_trial": 0.5}, ("ray.num_workers=1",), "the workers get one GPU each from ray.use_gpu=true"),
    ({"gpus_per_trial": 0.5}, ("run.device=cpu",), "sweep.gpus_per_trial: got 0.5 with run.device=cpu"),
    ({}, ("run.device=cuda",), "run.device: got 'cuda' with sweep.gpus_per_trial=0"),
    ({"cluster_max": {"cpus": 0}}, (), "sweep.cluster_max.cpus: got 0.0"),
    ({"cluster_max": {"gpu": 4}}, (), "unknown key sweep.cluster_max.gpu (did you mean sweep.cluster_max.gpus?)"),
]


@pytest.mark.parametrize("settings, overrides, message", BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_resource_settings_stop_before_any_work(tmp_path: Path, settings: dict, overrides: tuple,
                                                    message: str) -> None:
    with pytest.raises(ConfigError) as err:
        sweep_with(tmp_path, settings, *overrides)
    assert message in str(err.value)


def test_an_image_sweep_says_it_is_not_supported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"domain: got 'image'; sweeps fine-tune sequences only"):
        sweep_with(tmp_path, {}, "domain=image", "image.model=tiny", "image.clip_model=tiny")


def test_the_driver_plans_for_the_largest_cluster_when_autoscaling(tmp_path: Path, monkeypatch) -> None:
    from braid_ray.distributed import tune

    monkeypatch.setattr(tune.ray, "cluster_resources", lambda: {"CPU": 2.0})  # the head, before any worker node
    assert tune.max_concurrent_trials(sweep_with(tmp_path, {"cluster_max": {"cpus": 32}})) == 2
    stated = sweep_with(tmp_path, {"cluster_max": {"cpus": 32}}, AUTOSCALING)
    assert tune.autoscaler_max_resources() is None  # no Ray here: unknown, not an error
    assert tune.max_concurrent_trials(stated) == 32
    monkeypatch.setattr(tune, "autoscaler_max_resources", lambda: {"CPU": 8.0})  # where the platform publishes it
    assert tune.max_concurrent_trials(sweep_with(tmp_path, {}, AUTOSCALING)) == 8
    assert tune.max_concurrent_trials(sweep_with(tmp_path)) == 2  # a fixed cluster: the autoscaler is not asked


def test_run_debug_is_not_part_of_the_sweep_record(tmp_path: Path) -> None:
    """A failed sweep can be resumed with run.debug=true to see its traceback."""
    assert sweep_with(tmp_path, {}, "run.debug=true").record() == sweep_with(tmp_path).record()
    assert sweep_with(tmp_path, {}, "ray.num_workers=2").record() != sweep_with(tmp_path).record()


def test_a_later_finetune_key_at_its_default_is_not_part_of_the_sweep_record(tmp_path: Path) -> None:
    """A sweep started before finetune.pretrained_last_steps existed has no such key in its record; it resumes."""
    assert "pretrained_last_steps" not in sweep_with(tmp_path).record()["base"]["finetune"]
    assert sweep_with(tmp_path, {}, "finetune.pretrained_last_steps=1").record()["base"]["finetune"][
        "pretrained_last_steps"] == 1

"""The reward ensemble on a local Ray: Ray Train workers own slices of the members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from braid_ray import pipeline
from braid_ray.config import load_config
from braid_ray.reward.conservative import ConservativeReward, checkpoint_extra
from braid_ray.rundir import RunDir
from braid_ray.stages import data_stage, reward_stage, train_in_process
from tests.tiny import ROWS, TASK

SMALL = [*TASK, "reward.members=3", "reward.epochs=2", "reward.channels=8", "reward.hidden=16",
         "reward.batch_size=512"]


@pytest.mark.slow  # a Ray Train run of 2 workers: ~20 s on 2 CPUs, whatever the model size
def test_ray_ensemble_matches_in_process_members(tmp_path: Path, ray_local) -> None:
    cfg = load_config(None, [f"run.dir={tmp_path / 'ray'}", "ray.num_workers=2", *SMALL])
    summary = pipeline.run(cfg, stages=("data", "reward"))
    stage = RunDir(cfg.run.dir).stage("reward")
    for name in ("reward.safetensors", "calibration.json", "calibration.md", "members.json", "stage.json"):
        assert stage.exists(name), name
    data = stage.read_bytes("reward.safetensors")
    on_ray = ConservativeReward.from_bytes(data)
    assert on_ray.net.members == [0, 1, 2] and len(checkpoint_extra(data)["members"]) == 3
    assert set(summary["reward"]) == {"none", "min", "lcb", "bonus"}
    assert summary["reward"]["bonus"]["in"]["rows"] == round(0.1 * ROWS["D_off"])

    # The same members trained in one process, as one stack of 3, have the same weights as the two workers'.
    local_cfg = load_config(None, [f"run.dir={tmp_path / 'local'}", "ray.num_workers=0", *SMALL])
    run = RunDir(local_cfg.run.dir)
    local = reward_stage(local_cfg, run, data_stage(local_cfg, run), train_in_process)
    for key, value in local.net.state_dict().items():
        torch.testing.assert_close(on_ray.net.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)

    # Re-running the same config reuses the stage instead of training again.
    again = pipeline.run(cfg, stages=("data", "reward"))
    assert stage.read_bytes("reward.safetensors") == data and again["reward"] == summary["reward"]


def test_workers_that_do_not_fit_the_cluster_fail_fast(tmp_path: Path, ray_local) -> None:
    cfg = load_config(None, [f"run.dir={tmp_path}", "ray.num_workers=2", "ray.cpus_per_worker=1.5", *SMALL])
    with pytest.raises(ValueError, match=r"need CPU=3, the cluster has 2; lower ray.num_workers"):
        pipeline.run(cfg, stages=("data", "reward"))


def test_member_slices_cover_every_member_once() -> None:
    from braid_ray.distributed.reward import member_slices

    for members in (1, 3, 8):
        for workers in range(1, members + 1):
            slices = member_slices(members, workers)
            assert len(slices) == workers and sorted(np.concatenate(slices).tolist()) == list(range(members))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.slow  # a Ray Train run of 2 workers
def test_mlp_members_over_embeddings_train_on_ray_workers_like_in_process(tmp_path: Path, ray_local) -> None:
    """The image path's reward heads (MLP members over CLIP embeddings) are Ray Train workers too."""
    from braid_ray.distributed.reward import train_ensemble
    from braid_ray.reward.fit import mlp_spec, reward_data, train_spec
    from braid_ray.reward.train import train_members

    cfg = load_config(None, [f"run.dir={tmp_path}", "ray.num_workers=2", "reward.members=3", "reward.epochs=2",
                             "reward.hidden=8"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    rd = reward_data(x, x[:, 0] + 0.1 * rng.normal(size=200), 0.1, seed=0)
    spec = mlp_spec(cfg.reward, 6)
    net, metrics = train_ensemble(cfg, rd, str(tmp_path / "ray"), "heads", spec)
    local, _ = train_members(rd.codes, rd.z, [0, 1, 2], spec, train_spec(cfg.reward), cfg.run.seed, progress=False)
    assert net.members == [0, 1, 2] and [m["member"] for m in metrics] == [0, 1, 2]
    for key, value in local.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)

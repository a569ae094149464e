"""A fine-tuning run as a user meets it: interrupted and resumed, monitored with the oracle, and compared
with gradient ascent on the reward model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from braid_ray import pipeline
from braid_ray.baselines.grad import gradient_ascent
from braid_ray.config import load_config
from braid_ray.data.encoding import encode_strings
from braid_ray.finetune.run import load_reward
from braid_ray.finetune.trainer import FineTuner
from tests.tiny import FAST

# 5 reward epochs: after 1, the tiny ensemble is too flat for gradient ascent to move a design.
TINY = (*FAST, "reward.epochs=5", "finetune.methods=[braid_bonus]", "finetune.steps=4", "finetune.checkpoint_every=2")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """Data, reward and pretrained model of a tiny tfbind5 run, shared by the tests (copied per test)."""
    run = tmp_path_factory.mktemp("upstream") / "run"
    pipeline.run(load_config(None, [*TINY, f"run.dir={run}"]), stages=("data", "reward", "pretrain"))
    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_interrupted_fine_tuning_resumes_to_the_same_weights(upstream: Path, tmp_path: Path, monkeypatch) -> None:
    stages = ("data", "reward", "pretrain", "finetune")
    straight = _copy(upstream, tmp_path / "straight")
    pipeline.run(load_config(None, [*TINY, f"run.dir={straight}"]), stages=stages)

    broken = _copy(upstream, tmp_path / "broken")
    original = FineTuner.train_step

    def dies_at_step_three(self: FineTuner):
        if self.step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(FineTuner, "train_step", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(load_config(None, [*TINY, f"run.dir={broken}"]), stages=stages)
    stage = broken / "finetune" / "braid_bonus"
    assert (stage / "trainer_state.pt").is_file() and not (stage / "history.parquet").exists()
    assert torch.load(stage / "trainer_state.pt", weights_only=True)["step"] == 2  # the last checkpoint

    monkeypatch.setattr(FineTuner, "train_step", original)
    pipeline.run(load_config(None, [*TINY, f"run.dir={broken}"]), stages=stages)
    history = pd.read_parquet(stage / "history.parquet")
    assert history["step"].tolist() == [1, 2, 3, 4]
    resumed = load_file(stage / "trainable.safetensors")
    reference = load_file(straight / "finetune" / "braid_bonus" / "trainable.safetensors")
    assert resumed.keys() == reference.keys()
    for name, w in reference.items():  # the optimizer, schedule and RNG came back too: the same trajectory
        torch.testing.assert_close(resumed[name], w, rtol=1e-5, atol=1e-6)


def test_oracle_monitoring_spends_its_budget_and_never_changes_training(upstream: Path, tmp_path: Path) -> None:
    plain = _copy(upstream, tmp_path / "plain")
    watched = _copy(upstream, tmp_path / "watched")
    stages = ("data", "reward", "pretrain", "finetune")
    pipeline.run(load_config(None, [*TINY, f"run.dir={plain}"]), stages=stages)
    pipeline.run(load_config(None, [*TINY, f"run.dir={watched}", "finetune.monitor_queries=16",
                                 "finetune.monitor_every=2"]), stages=stages)
    history = pd.read_parquet(watched / "finetune" / "braid_bonus" / "history.parquet")
    assert history["oracle_queries"].tolist() == [0, 16, 0, 16]
    monitored = history["oracle"].to_numpy()
    assert np.isnan(monitored[[0, 2]]).all() and np.all((monitored[[1, 3]] >= 0) & (monitored[[1, 3]] <= 1))
    same = pd.read_parquet(plain / "finetune" / "braid_bonus" / "history.parquet")
    np.testing.assert_allclose(history["objective"], same["objective"], rtol=1e-6)


def test_gradient_ascent_raises_the_reward_model_score(upstream: Path) -> None:
    reward = load_reward(str(upstream), "none", 1.0)
    off = pd.read_parquet(upstream / "data" / "d_off.parquet")
    start = encode_strings(off.sort_values("y", ascending=False)["sequence"].head(64).tolist())
    moved = gradient_ascent(reward, start, steps=30, lr=0.2)
    assert moved.shape == start.shape and moved.dtype == np.int8
    before = reward(torch.from_numpy(np.eye(4, dtype=np.float32)[start]), penalty="none")[0]
    after = reward(torch.from_numpy(np.eye(4, dtype=np.float32)[moved]), penalty="none")[0]
    assert (moved != start).any() and after.mean() > before.mean()

"""Pretraining (and the conditional models of the DDOM / CFG baselines, which share its loop) survives an
interruption: after every pass its whole training state is saved, and a re-run continues from the last one to
the weights an uninterrupted run reaches. Pretraining utr_mrl takes about 50 minutes on one core; a run stopped
in its last pass should lose that pass, not the stage."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from braid_ray import pipeline, stages
from braid_ray.config import DiffusionConfig
from braid_ray.diffusion.pretrain import (build_backbone, build_denoiser, load_training_state, pretrain,
                                          training_state_bytes)
from braid_ray.rundir import StageCorrupt
from tests.tiny import tiny_config

PASSES = ("diffusion.epochs=3", "diffusion.batch_size=256")  # 4 steps per pass over tfbind5's 1,024 rows


def _denoiser(cfg: DiffusionConfig, length: int) -> torch.nn.Module:
    return build_denoiser(cfg, length, seed=3)


@pytest.mark.parametrize("backbone", ["gaussian_onehot", "masked"])
def test_pretraining_resumed_from_a_saved_pass_is_the_uninterrupted_one(backbone: str) -> None:
    cfg = DiffusionConfig(backbone=backbone, steps=5, channels=8, blocks=1, epochs=3, batch_size=64,
                          data_noise=0.1 if backbone == "gaussian_onehot" else 0.0)
    codes = np.random.default_rng(0).integers(0, 4, (200, 6)).astype(np.int8)
    straight = _denoiser(cfg, 6)
    saved: list[bytes] = []
    losses = pretrain(straight, build_backbone(cfg, 6), codes, cfg, seed=11,
                      save=lambda state: saved.append(training_state_bytes(state)))
    assert len(saved) == 3 and len(losses) == 3

    after_one = load_training_state(saved[0])  # as a re-run reads it from disk: through bytes, on the CPU
    assert after_one["losses"] == losses[:1]
    resumed = _denoiser(cfg, 6)  # a fresh model: everything it needs is in the state
    again = pretrain(resumed, build_backbone(cfg, 6), codes, cfg, seed=11, resume=after_one)
    assert again == losses  # the losses of passes 2 and 3 are the same numbers, not just close
    for name, w in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], w, rtol=0, atol=0)

    # Without the noise streams in the state it would be another run: the check above can fail.
    no_streams = dict(load_training_state(saved[0]), generator=torch.Generator().manual_seed(99).get_state())
    other = _denoiser(cfg, 6)
    assert pretrain(other, build_backbone(cfg, 6), codes, cfg, seed=11, resume=no_streams)[1:] != losses[1:]


def test_a_file_that_is_not_a_training_state_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a pretraining state: no \['generator', 'rng'\]"):
        load_training_state(training_state_bytes({"model": {}, "optimizer": {}, "schedule": {}, "losses": []}))


class _Killed(KeyboardInterrupt):
    pass


def _dies_after_pass(monkeypatch, n: int) -> None:
    """The stage's checkpoint writer, killed just after it has saved pass ``n`` (as a session ending would)."""
    original = stages.training_state_bytes

    def write(state: dict) -> bytes:
        data = original(state)
        if len(state["losses"]) == n + 1:  # pass n+1 is lost with the process
            raise _Killed(f"killed in pass {n + 1}")
        return data

    monkeypatch.setattr(stages, "training_state_bytes", write)


def test_an_interrupted_pretraining_stage_resumes_after_its_last_pass(tmp_path: Path, monkeypatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    straight = tmp_path / "straight"
    pipeline.run(tiny_config(f"run.dir={straight}", *PASSES), stages=("data", "pretrain"))

    broken = tmp_path / "broken"
    _dies_after_pass(monkeypatch, 1)
    with pytest.raises(_Killed):
        pipeline.run(tiny_config(f"run.dir={broken}", *PASSES), stages=("data", "pretrain"))
    stage = broken / "pretrain"
    assert not (stage / "stage.json").exists() and not (stage / "denoiser.safetensors").exists()
    assert len(load_training_state((stage / stages.TRAINING_STATE).read_bytes())["losses"]) == 1

    monkeypatch.undo()
    caplog.clear()  # only the re-run's lines (an earlier test may have left braid_ray logging at INFO)
    with caplog.at_level(logging.INFO, logger="braid_ray"):
        pipeline.run(tiny_config(f"run.dir={broken}", *PASSES), stages=("data", "pretrain"))
    assert "pretrain: resumed after pass 1" in caplog.text
    assert [r.getMessage() for r in caplog.records if "pretrain epoch" in r.getMessage()][0].startswith(
        "pretrain epoch 2/3")  # pass 1 was not trained again
    assert (stage / "stage.json").is_file()
    resumed = load_file(stage / "denoiser.safetensors")
    reference = load_file(straight / "pretrain" / "denoiser.safetensors")
    for name, w in reference.items():
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=0)


def test_an_unreadable_pretraining_checkpoint_is_named_and_overwrite_starts_again(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _dies_after_pass(monkeypatch, 1)
    with pytest.raises(_Killed):
        pipeline.run(tiny_config(f"run.dir={run}", *PASSES), stages=("data", "pretrain"))
    monkeypatch.undo()
    state = run / "pretrain" / stages.TRAINING_STATE
    state.write_bytes(state.read_bytes()[:100])  # truncated, as a full disk would leave it
    with pytest.raises(StageCorrupt, match=rf"{run}/pretrain: the interrupted run's checkpoint cannot be read "
                                           r".*set run.overwrite=true, to start it again"):
        pipeline.run(tiny_config(f"run.dir={run}", *PASSES), stages=("data", "pretrain"))
    pipeline.run(tiny_config(f"run.dir={run}", *PASSES, "run.overwrite=true"), stages=("data", "pretrain"))
    assert len(load_training_state(state.read_bytes())["losses"]) == 3


def test_the_conditional_baselines_resume_their_training_too(tmp_path: Path, monkeypatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ddom = ("baselines.methods=[ddom]", "baselines.epochs=3")
    straight = tmp_path / "straight"
    pipeline.run(tiny_config(f"run.dir={straight}", *PASSES, *ddom), stages=("data", "baselines"))
    broken = tmp_path / "broken"
    shutil.copytree(straight / "data", broken / "data")
    _dies_after_pass(monkeypatch, 2)
    with pytest.raises(_Killed):
        pipeline.run(tiny_config(f"run.dir={broken}", *PASSES, *ddom), stages=("data", "baselines"))
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="braid_ray"):
        pipeline.run(tiny_config(f"run.dir={broken}", *PASSES, *ddom), stages=("data", "baselines"))
    assert "baseline ddom: resumed after pass 2" in caplog.text and "baseline ddom epoch 1/3" not in caplog.text
    resumed = load_file(broken / "baselines" / "ddom" / "denoiser.safetensors")
    reference = load_file(straight / "baselines" / "ddom" / "denoiser.safetensors")
    for name, w in reference.items():
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=0)

"""Fine-tuning and pretraining on Ray Train survive a killed worker; fine-tuning stops cleanly on a NaN and loads
checkpoints without pickle.

The faults are injected by patching FineTuner inside the Ray workers (tests/faults.py); braid_ray has no test
hooks. The reward, pretrained model and data come from a tiny in-process run shared by the module.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray.cloudpickle
import torch
from ray.train import Checkpoint, WorkerGroupError
from safetensors.torch import load_file

from braid_ray import cli, pipeline
from braid_ray.config import Config, load_config
from braid_ray.distributed import train, workers
from braid_ray.finetune.run import FinetuneJob, build_finetuner, load_trainer_state, read_checkpoint
from tests import faults
from tests.conftest import ROOT
from tests.tiny import FAST, LENGTH

ray.cloudpickle.register_pickle_by_value(faults)  # the patched worker carries the fault code to Ray's workers

TWO_WORKERS = ("ray.num_workers=2", "finetune.methods=[braid_bonus]", "finetune.steps=4",
               "finetune.checkpoint_every=2")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A run directory with data, reward and pretrained model (in-process, tiny): what fine-tuning reads."""
    run = tmp_path_factory.mktemp("upstream")
    pipeline.run(load_config(None, [*FAST, f"run.dir={run}"]), stages=("data", "reward", "pretrain"))
    return run


def _config(run: Path) -> Config:
    return load_config(None, [*FAST, f"run.dir={run}", *TWO_WORKERS])


def _finetune(run: Path, storage: Path, name: str) -> tuple[dict, list[dict]]:
    return train.finetune_on_ray(_config(run), FinetuneJob(str(run), "braid_bonus", LENGTH), str(storage), name)


def _inject(monkeypatch, directory: Path, kind: str, step: int, rank: int) -> None:
    """Run the real fine-tuning worker with a fault installed first (in the worker process, where it fires)."""
    directory.mkdir(exist_ok=True)

    def worker(config: dict) -> dict:
        faults.install(str(directory), kind, step, rank)
        from braid_ray.distributed import train as unpatched  # the worker imports its own, unpatched module

        return unpatched._finetune_worker(config)

    monkeypatch.setattr(train, "_finetune_worker", worker)


@pytest.mark.slow
def test_killed_worker_resumes_from_its_last_checkpoint(upstream: Path, ray_local, tmp_path: Path,
                                                        monkeypatch) -> None:
    reference = _finetune(upstream, tmp_path / "ray", "uninterrupted")
    # Rank 1 is SIGKILLed as it starts step 3; the checkpoint of step 2 is the last one reported.
    _inject(monkeypatch, tmp_path / "faults", "kill", step=3, rank=1)
    state, history = _finetune(upstream, tmp_path / "ray", "killed")

    assert (tmp_path / "faults" / "kill.fired").is_file()
    # Both ranks started step 3 twice: the restarted group resumed at the checkpoint of step 2, not at step 1.
    for rank in (0, 1):
        assert faults.steps_started(tmp_path / "faults", rank) == [1, 2, 3, 3, 4]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # The resumed run is the uninterrupted one (each rank's sampler noise is restored too), up to float noise.
    for key in ("objective", "r_hat", "g_hat", "kl", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference[1]], rtol=1e-6, atol=1e-9,
                                   err_msg=key)
    for name, weights in state.items():
        torch.testing.assert_close(weights, reference[0][name], rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # two Ray Train pretrainings of 2 workers, one of them restarted
def test_killed_pretraining_worker_resumes_after_its_last_pass(ray_local, tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None, [*FAST, "ray.num_workers=2", "diffusion.epochs=3", "diffusion.batch_size=256"])
    codes = np.random.default_rng(0).integers(0, 4, (512, LENGTH)).astype(np.int8)
    reference, reference_losses = train.pretrain_on_ray(cfg, codes, str(tmp_path / "ray"), "uninterrupted")

    faults_dir = tmp_path / "faults"
    faults_dir.mkdir()

    def worker(config: dict) -> list[float]:
        faults.install_pretrain_kill(str(faults_dir), after_pass=1, rank=1)
        from braid_ray.distributed import train as unpatched

        return unpatched._pretrain_worker(config)

    monkeypatch.setattr(train, "_pretrain_worker", worker)
    state, losses = train.pretrain_on_ray(cfg, codes, str(tmp_path / "ray"), "killed")

    assert (faults_dir / "kill.fired").is_file()
    # The restarted group went on after pass 1 (a restart from scratch would log 1, 1, 2, 3).
    for rank in (0, 1):
        assert faults.passes_finished(faults_dir, rank) == [1, 2, 3]
    # Each rank's own noise streams came back with the weights and Adam: the uninterrupted run, exactly.
    assert losses == reference_losses
    for name, weights in reference.items():
        torch.testing.assert_close(state[name], weights, rtol=0, atol=0)


def test_a_pretraining_rank_without_its_own_file_takes_rank_0s_weights_with_fresh_noise(tmp_path: Path) -> None:
    """Resumed by more workers than wrote the checkpoint: DDP needs equal weights on every rank, and rank 0's
    noise streams must not be copied (two ranks would draw the same rows and noise). A rank with a noise file of
    its own gets its streams back."""
    from braid_ray.diffusion.pretrain import training_state_bytes

    written = {"model": {"w": torch.arange(3.0)}, "optimizer": {}, "schedule": {}, "losses": [0.5, 0.4],
               "generator": torch.Generator().manual_seed(1).get_state(),
               "rng": np.random.default_rng(1).bit_generator.state}
    (tmp_path / "pretrain_state.pt").write_bytes(training_state_bytes(written))
    noise_1 = {"generator": torch.Generator().manual_seed(2).get_state(),
               "rng": np.random.default_rng(2).bit_generator.state}
    (tmp_path / "pretrain_noise_rank0.pt").write_bytes(training_state_bytes({k: written[k] for k in noise_1}))
    (tmp_path / "pretrain_noise_rank1.pt").write_bytes(training_state_bytes(noise_1))
    own = train._rank_state(tmp_path, 0, seed=7, device=torch.device("cpu"))
    assert torch.equal(own["generator"], written["generator"]) and own["rng"] == written["rng"]
    mine = train._rank_state(tmp_path, 1, seed=1007, device=torch.device("cpu"))
    assert torch.equal(mine["generator"], noise_1["generator"]) and mine["rng"] == noise_1["rng"]
    assert torch.equal(mine["model"]["w"], written["model"]["w"])
    (tmp_path / "pretrain_noise_rank1.pt").unlink()  # written by one worker, resumed by two
    new = train._rank_state(tmp_path, 1, seed=1007, device=torch.device("cpu"))
    assert torch.equal(new["model"]["w"], written["model"]["w"]) and new["losses"] == [0.5, 0.4]
    assert torch.equal(new["generator"], torch.Generator().manual_seed(1009).get_state())
    assert new["rng"] == np.random.default_rng(1009).bit_generator.state != written["rng"]


@pytest.mark.slow  # a Ray Train run of 2 workers, restarted
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(upstream: Path, ray_local, tmp_path: Path,
                                                                        monkeypatch) -> None:
    _inject(monkeypatch, tmp_path / "faults", "nan", step=3, rank=0)
    with pytest.raises(FloatingPointError, match=r"fine-tune braid_bonus: fine-tuning step 3: non-finite") as error:
        _finetune(upstream, tmp_path / "ray", "nan")
    message = str(error.value)
    assert "(step 2, at " in message and "finetune.lr" in message
    # Not retried: a NaN recurs from the same checkpoint, so the run stops at its first occurrence.
    assert faults.steps_started(tmp_path / "faults", 0) == [1, 2, 3]

    kept = Path(re.search(r"\(step 2, at (.+?)\)", message).group(1))
    weights, history = read_checkpoint(kept)
    assert [h["step"] for h in history] == [1, 2]
    assert all(torch.isfinite(w).all() for w in weights.values())
    tuner = build_finetuner(_config(upstream), FinetuneJob(str(upstream), "braid_bonus", LENGTH), seed=0)
    load_trainer_state(tuner, kept)  # weights-only: safetensors + torch.load(weights_only=True)
    assert tuner.step == 2


class _FailingTrainer:
    """Stands in for a TorchTrainer whose workers kept failing: fit() raises what Ray Train V2's does then."""

    def fit(self):
        raise WorkerGroupError("rank 1: ...\nrank 0: ...", {1: RuntimeError("gloo: connection reset"),
                                                          0: ValueError("Traceback ...\nreward.safetensors: no member 3")})


def test_a_failed_run_is_one_message_naming_the_run_and_the_cause(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as error:
        workers.fit(_FailingTrainer(), "fine-tune strl", str(tmp_path), "strl-seed0")
    message = str(error.value)
    assert message.startswith("fine-tune strl failed on Ray Train (after up to 2 restarts): "
                              "rank 0: ValueError: reward.safetensors: no member 3.")
    assert f"resumes from the last checkpoint of {tmp_path}/strl-seed0" in message and "\n" not in message
    assert isinstance(error.value.__cause__, WorkerGroupError)  # the full story stays one `raise from` away


def test_a_checkpoint_on_remote_storage_is_read_from_a_local_copy(tmp_path: Path) -> None:
    """s3:// and gs:// checkpoints are downloaded before read_checkpoint opens them as files."""
    stored = tmp_path / "bucket" / "checkpoint_000001"
    stored.mkdir(parents=True)
    (stored / "history.json").write_text('[{"step": 1}]')
    remote = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())  # not a local filesystem
    with workers.local_dir(Checkpoint("checkpoint_000001", filesystem=remote)) as local:
        assert local != stored and (local / "history.json").read_text() == '[{"step": 1}]'
    assert not local.exists()  # the downloaded copy is removed after use
    with workers.local_dir(Checkpoint(str(stored))) as local:
        assert local == stored  # local storage: read in place


def test_launch_scripts_print_one_line_for_a_nonfinite_loss(caplog) -> None:
    def diverged() -> None:
        raise FloatingPointError("fine-tune strl: fine-tuning step 3: non-finite loss or gradient")

    with caplog.at_level(logging.ERROR, logger="braid_ray"), pytest.raises(SystemExit) as exit_:
        cli.run_main(diverged)
    assert exit_.value.code == 2
    assert [r.getMessage() for r in caplog.records] == ["fine-tune strl: fine-tuning step 3: non-finite loss or gradient"]


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == name and isinstance(n.func.value, ast.Name) and n.func.value.id == module]


def _keyword_is_true(call: ast.Call, key: str) -> bool:
    return any(k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_no_checkpoint_or_asset_is_ever_unpickled() -> None:
    """Weights are safetensors; the only torch.load is weights-only; no pickle, joblib or allow_pickle anywhere."""
    files = [p for folder in ("braid_ray", "launch", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        problems += [f"{where}:{c.lineno} torch.load without weights_only=True" for c in _calls(tree, "torch", "load")
                     if not _keyword_is_true(c, "weights_only")]
        problems += [f"{where}:{c.lineno} np.load(allow_pickle=True)" for c in _calls(tree, "np", "load")
                     if _keyword_is_true(c, "allow_pickle")]
        problems += [f"{where}:{c.lineno} pd.read_pickle" for c in _calls(tree, "pd", "read_pickle")]
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{where}:{node.lineno} imports {n}" for n in names
                         if n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal")]
    assert problems == []

"""A tiny SD fine-tuned on Ray Train with 2 workers under DeepSpeed ZeRO-1, -2 and -3 (gloo, CPU): training, a
worker failure and resume, checkpoints on storage that is not the local filesystem (as a bucket is), a
non-finite loss that stops every rank, ZeRO consolidation, LoRA export and a stock diffusers pipeline; and the
same run under NCCL where a GPU exists.

Faults and records are injected from here, by running the real worker with ImageFineTuner patched inside the
Ray worker process (braid_ray has no test hooks). Each rank records the steps it started, each step's K and the
devices of its parameters, generators and collective tensors, which must all be the worker's own device.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray.cloudpickle
import torch

from braid_ray.distributed import images, workers
from braid_ray.distributed.images import finetune_images_on_ray
from braid_ray.distributed.zero_export import consolidated_fp32
from braid_ray.images.components import load_components, stock_pipeline
from braid_ray.images.export import LORA_WEIGHT_NAME, save_lora_for_diffusers, unet_weights
from braid_ray.images.finetune import build_policy
from tests import faults
from tests.test_images_sampler import tiny_cfg, tiny_reward_bytes

ray.cloudpickle.register_pickle_by_value(faults)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the instrumented worker below travels by value

COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "reduce", "all_gather",
               "reduce_scatter")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def instrumented(directory: Path, fault: tuple[str, int, int] | None = None):
    """The real image worker, recording into ``directory``, with an optional fault (kind, step, rank): ``fail``
    raises once at the start of ``step`` (after the checkpoint before it is committed), ``nan`` poisons the
    reward from ``step`` on, as a divergence would."""
    folder = str(directory)

    def worker(config: dict) -> dict:
        import ray.train
        import torch.distributed as dist

        from braid_ray.distributed import images as unpatched  # the worker process imports its own
        from braid_ray.images.finetune import ImageFineTuner

        ctx = ray.train.get_context()
        rank, out = ctx.get_world_rank(), Path(folder)
        seen: dict[str, set[str]] = {"collectives": set(), "parameters": set(), "generators": set()}

        def record(fn):
            def call(*args, **kwargs):
                for a in (*args, *kwargs.values()):
                    seen["collectives"] |= {str(t.device) for t in (a if isinstance(a, (list, tuple)) else [a])
                                            if torch.is_tensor(t)}
                return fn(*args, **kwargs)
            return call

        for name in COLLECTIVES:
            setattr(dist, name, record(getattr(dist, name)))
        step = ImageFineTuner.train_step

        def train_step(self):
            if not seen["parameters"]:
                modules = [m for m in (self.policy, self.image_reward, self.policy.reference) if m is not None]
                seen["parameters"] |= {str(p.device) for m in modules for p in m.parameters()}
                seen["generators"] |= {str(self.generator.device)}
            with open(out / f"steps_rank{rank}.log", "a") as f:
                f.write(f"{self.step + 1}\n")
            if fault is not None and self.step + 1 == fault[1] and rank == fault[2]:
                if fault[0] == "fail" and faults._first_time(out, "fail"):
                    storage = ctx.get_storage()  # on a SubTreeFileSystem (a fake bucket), below its local base_path
                    base = Path(getattr(storage.storage_filesystem, "base_path", ""))
                    faults.wait_for_commit(base / storage.experiment_fs_path, self.step)
                    raise RuntimeError(f"injected worker failure at step {self.step + 1} (rank {rank})")
                if fault[0] == "nan":
                    faults._nan(self)
            metrics = step(self)
            with open(out / f"k_rank{rank}.log", "a") as f:
                f.write(f"{metrics.k}\n")
            return metrics

        ImageFineTuner.train_step = train_step
        try:
            return unpatched._worker(config)
        finally:
            seen["expected"] = {str(ray.train.torch.get_device())}
            (out / f"devices_rank{rank}.json").write_text(json.dumps({k: sorted(v) for k, v in seen.items()}))

    return worker


def _instrument(monkeypatch, directory: Path, fault: tuple[str, int, int] | None = None) -> Path:
    directory.mkdir(exist_ok=True)
    monkeypatch.setattr(images, "_worker", instrumented(directory, fault))
    return directory


def _as_bucket(monkeypatch, root: Path) -> None:
    """Ray Train storage on a filesystem other than the local one, as s3:// or gs:// are: whatever reads a
    checkpoint as a local path instead of through ``local_dir`` fails."""
    root.mkdir()
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    monkeypatch.setattr(images, "run_config", lambda *a, **kw: dataclasses.replace(workers.run_config(*a, **kw),
                                                                                   storage_filesystem=fs))


def _lines(directory: Path, name: str) -> list[int]:
    path = directory / name
    return [int(x) for x in path.read_text().split()] if path.is_file() else []


def assert_devices(directory: Path, ranks: int, kind: str) -> None:
    """Every parameter, generator and collective tensor of every rank on that rank's own device."""
    for rank in range(ranks):
        seen = json.loads((directory / f"devices_rank{rank}.json").read_text())
        (expected,) = seen["expected"]
        assert expected.startswith(kind), seen
        assert seen["parameters"] == seen["generators"] == [expected], seen
        assert seen["collectives"] and set(seen["collectives"]) == {expected}, seen


# ZeRO-2 with the default checkpoints (LoRA weights only), on storage that is not a local path; ZeRO-3 also
# writes the frozen UNet shards, so the test can check that they come back unchanged.
@pytest.mark.slow  # Ray Train + DeepSpeed on 2 ranks, killed and resumed: ~1.5 min on 2 CPUs
@pytest.mark.parametrize("stage, save_frozen, bucket", [(2, False, True),
                                                        (3, True, False)])
def test_zero_training_resumes_after_a_failure_and_exports_lora_for_diffusers(
        stage: int, save_frozen: bool, bucket: bool, tmp_path: Path, ray_local, monkeypatch) -> None:
    cfg = tiny_cfg(f"run.dir={tmp_path}", f"deepspeed.zero_stage={stage}", f"deepspeed.save_frozen={save_frozen}",
                   "finetune.steps=3", "finetune.checkpoint_every=2", "finetune.methods=[braid_bonus]",
                   "finetune.k=4", "finetune.randomize_k=true")
    records = _instrument(monkeypatch, tmp_path / "records", ("fail", 3, 1))
    if bucket:
        _as_bucket(monkeypatch, tmp_path / "bucket")
    storage = "ray" if bucket else str(tmp_path / "ray")
    trained, history = finetune_images_on_ray(cfg, "braid_bonus", tiny_reward_bytes(cfg), storage, f"zero{stage}")
    assert (records / "fail.fired").is_file()
    for rank in (0, 1):  # rank 1 died at the start of step 3; the group resumed from the step-2 checkpoint
        assert _lines(records, f"steps_rank{rank}.log") == [1, 2, 3, 3]
    ks = [_lines(records, f"k_rank{rank}.log") for rank in (0, 1)]
    assert ks[0] == ks[1] and len(ks[0]) == 3  # K from run.seed: the same on every rank, also after the resume
    assert_devices(records, 2, "cpu")
    if bucket:
        assert not (tmp_path / "ray").exists() and any((tmp_path / "bucket" / "ray").iterdir())

    assert [h["step"] for h in history] == [1, 2, 3] and [h["k"] for h in history] == ks[0]
    assert all(np.isfinite(h[k]) for h in history for k in ("objective", "r_hat", "g_hat", "kl", "oracle"))
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0  # LoRA B starts at zero: theta = pretrained

    pretrained = build_policy(cfg, torch.device("cpu")).state_dict()  # same seed: same LoRA A, B = 0
    lora = [k for k in pretrained if ".lora_" in k]
    frozen = [k for k in trained if ".lora_" not in k]
    assert set(trained) == (set(pretrained) if save_frozen else set(lora))
    assert any(not torch.equal(trained[k], pretrained[k]) for k in lora if ".lora_B." in k)
    assert all(torch.equal(trained[k], pretrained[k]) for k in frozen)

    path = save_lora_for_diffusers(unet_weights(trained), tmp_path / "export")
    assert path.name == LORA_WEIGHT_NAME
    pipe = stock_pipeline(load_components("tiny"))
    pipe.set_progress_bar_config(disable=True)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 16)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(path.parent), weight_name=LORA_WEIGHT_NAME)
        tuned = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert not torch.allclose(base, tuned)  # the fine-tuned adapters are active in the stock pipeline
    out = pipe(["a cat", "a dog"], num_inference_steps=3, height=16, width=16, guidance_scale=3.0,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()


@pytest.mark.slow  # Ray Train + DeepSpeed on 2 ranks
def test_a_nonfinite_loss_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(
        tmp_path: Path, ray_local, monkeypatch) -> None:
    cfg = tiny_cfg(f"run.dir={tmp_path}", "deepspeed.zero_stage=1", "finetune.steps=4", "finetune.checkpoint_every=1",
                   "finetune.methods=[strl]")
    records = _instrument(monkeypatch, tmp_path / "records", ("nan", 4, 1))
    with pytest.raises(FloatingPointError, match=r"fine-tune strl: fine-tuning step 4: non-finite loss") as error:
        finetune_images_on_ray(cfg, "strl", tiny_reward_bytes(cfg), str(tmp_path / "ray"), "nan")
    message = str(error.value)
    assert "finetune.lr" in message and "\n" not in message
    for rank in (0, 1):  # both ranks stopped at step 4, before backward, and the run was not retried
        assert _lines(records, f"steps_rank{rank}.log") == [1, 2, 3, 4]
    assert_devices(records, 2, "cpu")

    kept = Path(re.search(r"\(step 3, at (.+?)\)", message).group(1))
    assert [h["step"] for h in json.loads((kept / images.HISTORY).read_text())] == [1, 2, 3]
    weights = consolidated_fp32(kept)  # the good weights of step 3, ZeRO-1's optimizer shards merged
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    checkpoints = [p for p in (tmp_path / "ray" / "nan").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == images.KEEP_CHECKPOINTS  # older ones pruned


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("stage", [1, 2])
def test_one_lora_step_over_nccl(stage: int, tmp_path: Path, ray_local, monkeypatch) -> None:
    """One SD LoRA step under ZeRO-1 (DDP-like: gradients all-reduced whole) and ZeRO-2, on GPU workers."""
    n = min(2, torch.cuda.device_count())
    cfg = tiny_cfg(f"run.dir={tmp_path}", "ray.use_gpu=true", f"ray.num_workers={n}",
                   f"deepspeed.zero_stage={stage}", "finetune.steps=1", f"finetune.batch_size={2 * n}")
    records = _instrument(monkeypatch, tmp_path / "records")
    trained, history = finetune_images_on_ray(cfg, "strl", tiny_reward_bytes(cfg), str(tmp_path / "ray"), "nccl")
    assert [h["step"] for h in history] == [1] and np.isfinite(history[0]["objective"])
    assert history[0]["peak_memory_mb"] > 0 and trained
    assert_devices(records, n, "cuda")

"""A tiny SD fine-tuned on Ray Train with 2 workers under DeepSpeed ZeRO-2 and ZeRO-3 (gloo, CPU):
training, a worker failure and resume, ZeRO consolidation, LoRA export and a stock diffusers pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from braid_ray.images.components import load_components, stock_pipeline
from braid_ray.distributed.zero_export import consolidated_fp32
from braid_ray.distributed.images import finetune_images_on_ray
from braid_ray.images.export import LORA_WEIGHT_NAME, save_lora_for_diffusers, unet_weights
from braid_ray.images.finetune import build_policy
from tests.test_images_sampler import tiny_cfg, tiny_reward_bytes


# ZeRO-2 with the default checkpoints (LoRA weights only); ZeRO-3 also writes the frozen UNet shards, so the
# test can check that they come back unchanged.
@pytest.mark.parametrize("stage, save_frozen", [(2, False), (3, True)])
def test_zero_training_resumes_after_a_failure_and_exports_lora_for_diffusers(stage: int, save_frozen: bool,
                                                                             tmp_path: Path, ray_local) -> None:
    cfg = tiny_cfg(f"run.dir={tmp_path}", f"deepspeed.zero_stage={stage}", f"deepspeed.save_frozen={save_frozen}",
                   "finetune.steps=3", "finetune.checkpoint_every=2", "finetune.methods=[braid_bonus]")
    marker = tmp_path / "failed_once"
    ckpt = finetune_images_on_ray(cfg, "braid_bonus", tiny_reward_bytes(cfg), str(tmp_path / "ray"), f"zero{stage}",
                                  fail_at_step=3, fail_marker=str(marker))
    assert marker.exists()  # the last rank died at step 3; the group restarted from the step-2 checkpoint
    history = json.loads((ckpt / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h[k]) for h in history for k in ("objective", "r_hat", "g_hat", "kl", "oracle"))
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0  # LoRA B starts at zero: theta = pretrained

    trained = consolidated_fp32(ckpt)  # every rank's shards, merged by Ray into one checkpoint
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
    images = pipe(["a cat", "a dog"], num_inference_steps=3, height=16, width=16, guidance_scale=3.0,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

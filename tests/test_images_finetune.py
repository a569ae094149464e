"""The ImageFineTuner's contracts with its callers, in one process (no Ray, no DeepSpeed): K shared by the ranks,
a non-finite loss stopped before backward on every rank, the oracle in the step's metrics, and sampling for
evaluation under inference mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from braid_ray.images import evaluate as ev
from braid_ray.images.finetune import ImageFineTuner, build_policy, load_image_reward
from tests.test_images_sampler import tiny_cfg, tiny_reward_bytes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_cfg("finetune.batch_size=2", "finetune.randomize_k=true", "finetune.k=4", "diffusion.steps=4")
    policy = build_policy(cfg, CPU)
    return cfg, policy, load_image_reward(cfg, tiny_reward_bytes(cfg), "braid_bonus", CPU)


class FakeEngine:
    """Records what the tuner asks of a DeepSpeed engine; backward is plain autograd."""

    def __init__(self):
        self.calls: list[str] = []

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool) -> None:
        self.calls.append("backward")
        loss.backward()

    def step(self) -> None:
        self.calls.append("step")

    def get_global_grad_norm(self) -> float:
        return 1.0

    def fp16_enabled(self) -> bool:
        return False


def test_k_is_the_same_on_every_rank_and_the_noise_is_not(parts) -> None:
    cfg, policy, reward = parts
    ranks = [ImageFineTuner(policy, reward, cfg, seed=cfg.run.seed + 7919 * r, world_size=2) for r in range(2)]
    ks = [[t._k() for _ in range(30)] for t in ranks]
    assert ks[0] == ks[1] and len(set(ks[0])) > 1  # randomised, and identical: ZeRO-3 would hang otherwise
    noise = [t.generator.initial_seed() for t in ranks]
    assert noise[0] != noise[1]  # each rank its own prompts and noise


def test_a_nonfinite_loss_raises_before_backward_on_every_rank(parts) -> None:
    cfg, policy, reward = parts
    tuner = ImageFineTuner(policy, reward, cfg, seed=0, world_size=2, all_finite=lambda ok: ok)
    engine = FakeEngine()
    tuner.attach(engine)
    reward_fn = tuner.reward_fn
    tuner.reward_fn = lambda x0: (reward_fn(x0)[0] * math.nan, reward_fn(x0)[1])
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss \("):
        tuner.train_step()
    assert engine.calls == [] and tuner.step == 0  # no gradient reduction started, no update

    # A finite loss here while another rank's is not: this rank stops too, at the same point.
    tuner = ImageFineTuner(policy, reward, cfg, seed=0, world_size=2, all_finite=lambda ok: False)
    tuner.attach(engine)
    with pytest.raises(FloatingPointError, match="step 1: non-finite loss on another worker"):
        tuner.train_step()
    assert engine.calls == []


def test_an_engine_step_reports_the_oracle_in_its_metrics(parts) -> None:
    cfg, policy, reward = parts
    agreed: list[bool] = []
    tuner = ImageFineTuner(policy, reward, cfg, seed=0, world_size=2, all_finite=lambda ok: agreed.append(ok) or ok)
    engine = FakeEngine()
    tuner.attach(engine)
    m = tuner.train_step()
    assert engine.calls == ["backward", "step"] and agreed == [True] and m.step == tuner.step == 1
    assert math.isfinite(m.oracle) and m.oracle == tuner.last_oracle and m.grad_norm == 1.0
    policy.zero_grad(set_to_none=True)


def test_evaluation_samples_under_inference_mode_and_leaves_the_policy_trainable(parts) -> None:
    cfg, policy, reward = parts
    modes: list[bool] = []
    hook = policy.unet.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    pixels, scores = ev.sample_and_score(policy, reward, ["a cat", "a dog", "a fish"], seed=1, batch=2)
    hook.remove()
    assert modes and all(modes) and pixels.shape == (3, 16, 16, 3) and len(scores) == 3
    again, _ = ev.sample_and_score(policy, reward, ["a cat", "a dog", "a fish"], seed=1, batch=2)
    assert (again == pixels).all()  # the same noise for every method: seeded CPU generators
    # The prompt embedding cached during evaluation is an inference tensor: training afterwards still works.
    tuner = ImageFineTuner(policy, reward, cfg, seed=0)
    loss, _ = tuner.loss(tuner.sample(2, 1))
    loss.backward()
    assert any(p.grad is not None for p in tuner.params)
    policy.zero_grad(set_to_none=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_in_process_step_and_evaluation_run_on_the_gpu() -> None:
    from braid_ray.devices import resolve_device

    cfg = tiny_cfg("finetune.batch_size=2", "run.device=cuda")
    device = resolve_device(cfg.run.device)
    policy = build_policy(cfg, device)
    reward = load_image_reward(cfg, tiny_reward_bytes(cfg), "strl", device)
    tuner = ImageFineTuner(policy, reward, cfg, seed=0, device=device)
    assert {p.device.type for m in (policy, reward) for p in m.parameters()} == {"cuda"}
    assert tuner.generator.device.type == "cuda"
    m = tuner.train_step()
    assert math.isfinite(m.objective) and math.isfinite(m.oracle)
    pixels, scores = ev.sample_and_score(policy, reward, ["a cat", "a dog"], seed=0, batch=2)
    assert pixels.shape == (2, 16, 16, 3) and np.isfinite(scores["oracle"]).all()

"""The device contract, checked without a GPU: on a Ray Train worker with ``ray.use_gpu`` every model, tensor
and generator lives on ``ray.train.torch.get_device()``, collectives reduce tensors on that device (NCCL
reduces CUDA tensors only), and K is the same on every rank.

Three checks stand in for a GPU here: the sampler, the conservative reward and the pretraining loss run on
PyTorch's ``meta`` device, a device other than the CPU that exists without a GPU (any CPU tensor mixed in
raises, as it would on CUDA; a CPU-only torch cannot even create fake CUDA parameters); a recorder finds tensor
factories in braid_ray called without ``device=`` during real CPU runs; a recording process group checks the
device of every reduced tensor. GPU tests that run the real thing are marked ``gpu`` (tests/test_gpu.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.pretrain import pretrain
from braid_ray.diffusion.sampler import FineTunedPolicy, rollout
from braid_ray.config import DiffusionConfig
from braid_ray.finetune.loop import ProgressSink, drive
from braid_ray.finetune.trainer import FineTuner
from braid_ray.reward.conservative import ConservativeReward, RewardStats
from braid_ray.reward.stacked import StackSpec, build_stack
from braid_ray.reward.train import TrainSpec, train_members
from tests.conftest import ROOT
from tests.devices import FactoryCalls, RecordingCollectives

DEVICE = torch.device("meta")  # stands in for a worker's GPU
L = 6


def _reward(members: int = 3) -> ConservativeReward:
    net = build_stack(StackSpec(L, channels=4, layers=1, kernel_size=3, hidden=8, spectral_norm=True),
                      list(range(members)), seed=0)
    stats = RewardStats(y_mean=0.5, y_std=2.0, bonus_lambda=1.0, lcb_scale=1.0, bonus_scale=1.0)
    eye = torch.eye(8).expand(members, 8, 8).contiguous()
    return ConservativeReward(net, stats, torch.zeros(members, 8), eye, eye, penalty="bonus")


def _policy(steps: int = 6) -> FineTunedPolicy:
    backbone = GaussianOneHotDiffusion(L, steps=steps, eta=1.0)
    return FineTunedPolicy(backbone, ConvDenoiser(L, 8, 1, 3, 8), "shift")


@pytest.mark.parametrize("penalty", ["none", "min", "lcb", "bonus"])
def test_sampler_and_reward_stay_on_a_cuda_device(penalty: str) -> None:
    """One fine-tuning objective, forward and backward, entirely on the worker's (non-CPU) device."""
    policy = _policy().to(DEVICE)
    reward = _reward().with_penalty(penalty).to(DEVICE)
    roll = rollout(policy, 4, 3, None, DEVICE)
    r_hat, g_hat = reward(policy.backbone.reward_input(roll.x0))
    loss = -(r_hat - g_hat).mean() + 1e-3 * roll.kl.mean()
    loss.backward()
    grads = [p.grad for p in policy.trainable.parameters()]
    assert roll.x0.device == roll.kl.device == r_hat.device == DEVICE
    assert all(g is not None and g.device == DEVICE for g in grads)


def test_pretraining_loss_and_sampling_stay_on_the_workers_device() -> None:
    backbone = GaussianOneHotDiffusion(L, steps=5)
    model = ConvDenoiser(L, 8, 1, 3, 8).to(DEVICE)
    x0 = backbone.encode(torch.randint(0, 4, (4, L), device=DEVICE))
    loss = backbone.loss(model, x0)
    loss.backward()
    sample = backbone.sample(model, 3, None, DEVICE)
    assert loss.device == sample.device == DEVICE


def test_a_mixed_device_bug_is_caught_by_the_stand_in_device() -> None:
    """The negative control: a CPU tensor meeting one on the stand-in device fails, as with CUDA."""
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device=DEVICE) + torch.ones(3)


def test_braid_ray_tensor_factories_name_their_device(tmp_path: Path) -> None:
    """Every tensor braid_ray creates during fine-tuning, pretraining and reward training names its device
    (so on a GPU worker nothing lands on the CPU by accident)."""
    torch.manual_seed(0)
    policy, reward = _policy(), _reward()
    cfg = DiffusionConfig(steps=5, channels=8, blocks=1, kernel_size=3, emb_dim=8, epochs=1, batch_size=8,
                          data_noise=0.1)
    codes = np.random.default_rng(0).integers(0, 4, (24, L))
    with FactoryCalls() as calls:
        tuner = FineTuner(policy, lambda x: reward(policy.backbone.reward_input(x)), alpha=1e-3, k=2, batch_size=4,
                          lr=1e-3, steps=2, randomize_k=True)
        drive(tuner, 2, sinks=[ProgressSink("ft", 2, 1, bar=False)])
        pretrain(ConvDenoiser(L, 8, 1, 3, 8), GaussianOneHotDiffusion(L, steps=5), codes, cfg, seed=0)
        train_members(codes, codes[:, 0].astype(float), [0, 1], StackSpec(L, 4, 1, 3, 8), TrainSpec(epochs=1),
                      seed=0, progress=False)
    assert calls.checked > 10, "the recorder saw braid_ray's factory calls"
    assert calls.missing == []


def test_the_factory_recorder_catches_a_device_less_tensor() -> None:
    from braid_ray.distributed import workers

    values = {"a": 1.0}
    with FactoryCalls() as calls:
        torch.tensor(list(values.values()))  # from a test file: not braid_ray, not counted
        workers.mean_over_ranks(values, torch.device("cpu"))  # braid_ray code, world 1: no tensor at all
    assert calls.missing == []
    source = Path(workers.__file__).read_text()
    assert "torch.tensor(list(values.values()), dtype=torch.float64, device=device)" in source


def test_collectives_reduce_tensors_on_the_workers_device(monkeypatch) -> None:
    from braid_ray.distributed.workers import average_gradients, mean_over_ranks, synced

    group = RecordingCollectives(monkeypatch)
    device = torch.device("cpu")
    with FactoryCalls() as calls:
        assert mean_over_ranks({"a": 1.0, "b": 3.0}, device) == {"a": 1.0, "b": 3.0}
        metrics, stop = synced(device, ["loss", "kl"])({"loss": 2.0, "kl": 0.5}, None)
        policy = _policy()
        policy.trainable(torch.randn(2, L, 4), torch.ones(2, dtype=torch.long)).sum().backward()
        params = [p for p in policy.trainable.parameters()]
        average_gradients(params)
    assert metrics == {"loss": 2.0, "kl": 0.5} and stop is None
    assert calls.missing == []
    assert len(group.devices) == 2 + sum(p.grad is not None for p in params)
    assert set(group.devices) == {device}


def test_a_nonfinite_step_on_one_rank_stops_every_rank(monkeypatch) -> None:
    from braid_ray.distributed.workers import synced

    RecordingCollectives(monkeypatch)
    sync = synced(torch.device("cpu"), ["loss"])
    # this rank was fine, but the reduced flag says another was not (its share is 1 of 2 ranks)
    monkeypatch.setattr("torch.distributed.all_reduce", lambda t, *a, **k: t.add_(torch.tensor([0.0, 1.0])))
    _, stop = sync({"loss": 1.0}, None)
    assert stop is not None and "another worker" in stop


def test_k_is_the_same_on_every_rank() -> None:
    """Ranks draw their own sampler noise but the same K at every step (ZeRO-3 would hang otherwise)."""
    policy = _policy(steps=8)
    ranks = [FineTuner(policy, lambda x: (x.sum((1, 2)), torch.zeros(len(x))), alpha=0.0, k=8, batch_size=2,
                       lr=1e-3, steps=5, randomize_k=True, seed=100 + rank, k_seed=7) for rank in range(3)]
    draws = [[t._k() for _ in range(20)] for t in ranks]
    assert draws[0] == draws[1] == draws[2] and len(set(draws[0])) > 2
    noise = [t.generator.initial_seed() for t in ranks]
    assert len(set(noise)) == 3


def test_distributed_code_never_keeps_a_model_off_the_workers_device() -> None:
    """prepare_model must move the module to the worker's device (``move_to_device=False`` left the sequence
    denoiser on the CPU under NCCL); no library code hard-codes ``.cuda()`` or a "cuda" default."""
    problems = []
    for path in sorted((ROOT / "braid_ray").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "prepare_model":
                problems += [f"{path.name}:{node.lineno}" for k in node.keywords
                             if k.arg == "move_to_device" and isinstance(k.value, ast.Constant) and not k.value.value]
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "cuda" and not node.args:
                problems.append(f"{path.name}:{node.lineno} .cuda()")
    assert problems == []

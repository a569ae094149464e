"""ZeRO-2 computes the gradient plain torch computes: the full tiny UNet (65k parameters) trained at K = 3 by 2
ranks (gloo, CPU) through the production engine, with a reduce bucket of 5k elements, so the gradients are
reduced in many buckets and partitioned across the ranks.

With SGD and no clipping, the update ZeRO-2 applies is -lr times the rank-averaged gradient; each rank
also computes its own batch's gradient with plain autograd on an identical tuner, and the ranks average those.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import ray.cloudpickle
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from tests.test_images_sampler import tiny_cfg, tiny_reward_bytes

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker below travels by value

BUCKET = 5_000  # elements per reduce / all-gather bucket; the largest single parameter has 4,608
LR = 1e3  # a large step, so that the weights' fp32 rounding is small against the update


def _gradients(config: dict) -> dict[str, dict[str, np.ndarray]]:
    import ray.train
    import torch.distributed as dist

    from braid_ray.config import from_dict
    from braid_ray.distributed.images import _import_deepspeed, build_engine
    from braid_ray.images.finetune import ImageFineTuner, build_policy, load_image_reward

    torch.set_num_threads(1)
    cfg = from_dict(config["cfg"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    deepspeed = _import_deepspeed(use_gpu=False)
    cpu = torch.device("cpu")

    def tuner() -> ImageFineTuner:  # the same weights, prompts and noise each time it is built on this rank
        return ImageFineTuner(build_policy(cfg, cpu), load_image_reward(cfg, config["reward"], "strl", cpu), cfg,
                              seed=100 + rank, device=cpu, world_size=world)

    plain = tuner()
    loss, _ = plain.loss(plain.sample(plain.batch_size, plain._k()))
    loss.backward()
    reference = {n: p.grad.clone() for n, p in plain.policy.named_parameters() if p.requires_grad}
    for g in reference.values():
        dist.all_reduce(g)
        g /= world

    zero = tuner()
    zero.optimizer = torch.optim.SGD(zero.params, lr=LR)  # the update is then -LR times the gradient
    before = {n: p.detach().clone() for n, p in zero.policy.named_parameters() if p.requires_grad}
    engine = build_engine(deepspeed, zero, cfg, world)
    zero.attach(engine)
    m = zero.train_step()
    update = {n: (before[n] - p.detach()) / LR for n, p in zero.policy.named_parameters() if n in before}
    return {"reference": {n: g.numpy() for n, g in reference.items()},
            "zero": {n: u.numpy() for n, u in update.items()},
            "info": {"k": np.array(m.k), "stage": np.array(engine.zero_optimization_stage())}}


@pytest.mark.slow  # DeepSpeed ZeRO-2 on 2 Ray Train ranks
def test_zero2_gradients_equal_plain_torch_gradients(tmp_path, ray_local) -> None:
    cfg = tiny_cfg("image.lora_rank=0", "deepspeed.zero_stage=2", f"deepspeed.bucket_size={BUCKET}",
                   "finetune.k=3", "finetune.randomize_k=false", "diffusion.steps=4", "finetune.clip=0",
                   "finetune.batch_size=4", "finetune.alpha=0.1")
    trainer = TorchTrainer(
        _gradients, train_loop_config={"cfg": cfg.to_dict(), "reward": tiny_reward_bytes(cfg)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="zero2-grads", storage_path=str(tmp_path)))
    out = trainer.fit().return_value
    assert int(out["info"]["k"]) == 3 and int(out["info"]["stage"]) == 2
    reference, zero = out["reference"], out["zero"]
    assert set(zero) == set(reference) and sum(g.size for g in reference.values()) > 10 * BUCKET
    for name, g in reference.items():
        np.testing.assert_allclose(zero[name], g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=name)
    flat = np.concatenate([g.ravel() for g in reference.values()])
    assert np.abs(flat).max() > 0  # a real gradient, not two zeros agreeing

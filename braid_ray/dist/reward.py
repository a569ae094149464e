"""The reward ensemble on Ray Train: each worker trains its own slice of the M members as one stack.

Members are independent, so there is no gradient all-reduce; each rank writes its members to a file of
its own in the reported checkpoint (Ray merges the ranks' files into one directory) and the driver
gathers them into one StackedNet.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from braid_ray.config import Config, from_dict
from braid_ray.dist import cluster
from braid_ray.dist.train import MAX_FAILURES, fit
from braid_ray.reward.fit import RewardData, stack_spec, train_spec
from braid_ray.reward.stacked import StackedNet
from braid_ray.reward.train import train_members


def member_slices(members: int, workers: int) -> list[list[int]]:
    """Contiguous, nearly equal slices of member ids 0..M-1, one per worker."""
    return [s.tolist() for s in np.array_split(np.arange(members), workers)]


def _worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = from_dict(config["cfg"])
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    members = member_slices(cfg.reward.members, world)[rank]
    codes, z = np.asarray(config["codes"], dtype=np.int8), np.asarray(config["z"], dtype=np.float64)
    net, metrics = train_members(codes, z, members, stack_spec(cfg.reward, codes.shape[1]),
                                 train_spec(cfg.reward), cfg.run.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for i, member in enumerate(members):
            save_file(net.member_state(i), f"{tmp}/member_{member:04d}.safetensors")
        Path(f"{tmp}/metrics_rank{rank}.json").write_text(json.dumps(metrics))
        ray.train.report({"members": len(members)}, checkpoint=Checkpoint.from_directory(tmp))


def train_ensemble(cfg: Config, data: RewardData, storage_path: str, name: str) -> tuple[StackedNet, list[dict]]:
    """Train all M members on Ray Train (min(ray.num_workers, M) workers) and gather them on the driver."""
    cluster.init(cfg.ray)
    workers = min(cfg.ray.num_workers, cfg.reward.members)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray),
                           "codes": data.codes, "z": data.z},
        scaling_config=cluster.scaling(cfg.ray, workers),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    result = fit(trainer, "reward ensemble", storage_path, name)
    with result.checkpoint.as_directory() as d:
        files = sorted(Path(d).glob("member_*.safetensors"))
        states = [load_file(f) for f in files]
        metrics = [m for f in sorted(Path(d).glob("metrics_rank*.json")) for m in json.loads(f.read_text())]
    ids = [int(f.stem.split("_")[1]) for f in files]
    if ids != list(range(cfg.reward.members)):
        raise RuntimeError(f"reward checkpoint {result.checkpoint.path} holds members {ids}, "
                           f"expected 0..{cfg.reward.members - 1}")
    spec = stack_spec(cfg.reward, data.codes.shape[1])
    return StackedNet.from_members(spec, ids, states).eval(), sorted(metrics, key=lambda m: m["member"])

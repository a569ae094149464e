"""The reward ensemble on Ray Train: each worker trains its own slice of the M members as one stack.

Members are independent, so there is no gradient all-reduce; each rank writes its members to a file of
its own in the reported checkpoint (Ray merges the ranks' files into one directory) and the driver
gathers them into one StackedNet.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from braid_ray.config import Config
from braid_ray.distributed import cluster
from braid_ray.distributed.workers import check_storage, fit, local_dir, run_config, setup_worker
from braid_ray.reward.fit import RewardData, stack_spec, train_spec
from braid_ray.reward.stacked import STACKS, MLPSpec, StackedMLP, StackedNet, StackSpec, spec_kind
from braid_ray.reward.train import train_members


def member_slices(members: int, workers: int) -> list[list[int]]:
    """Contiguous, nearly equal slices of member ids 0..M-1, one per worker."""
    return [s.tolist() for s in np.array_split(np.arange(members), workers)]


def _worker(config: dict) -> None:
    w = setup_worker(config)
    cfg = w.cfg
    members = member_slices(cfg.reward.members, w.world)[w.rank]
    codes, z = (np.array(a) for a in ray.get(config["rows"]))  # writable copies of the object store's views
    net, metrics = train_members(codes, z, members, config["spec"], train_spec(cfg.reward), cfg.run.seed,
                                 progress=w.rank == 0, device=w.device)
    with tempfile.TemporaryDirectory() as tmp:
        for i, member in enumerate(members):
            save_file(net.member_state(i), f"{tmp}/member_{member:04d}.safetensors")
        Path(f"{tmp}/metrics_rank{w.rank}.json").write_text(json.dumps(metrics))
        ray.train.report({"members": len(members)}, checkpoint=Checkpoint.from_directory(tmp))


def train_ensemble(cfg: Config, data: RewardData, storage_path: str, name: str,
                   spec: StackSpec | MLPSpec | None = None) -> tuple[StackedNet | StackedMLP, list[dict]]:
    """Train all M members on Ray Train (min(ray.num_workers, M) workers, each on its own device: a GPU per
    worker with ``ray.use_gpu``) and gather them on the driver. ``spec``: CNN members over the sequences
    (default) or MLP members over vectors such as image embeddings (``data.codes`` (N, D))."""
    spec = spec or stack_spec(cfg.reward, data.codes.shape[1])
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, storage_path)
    workers = min(cfg.ray.num_workers, cfg.reward.members)
    rows = ray.put((np.asarray(data.codes), np.asarray(data.z, dtype=np.float64)))  # the object store, not the config
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": cluster.threads_per_worker(cfg.ray), "rows": rows,
                           "spec": spec},
        scaling_config=cluster.scaling(cfg.ray, workers),
        run_config=run_config(name, storage_path, ray_logs=cfg.tracking.ray_logs))
    result = fit(trainer, "reward ensemble", storage_path, name)
    with local_dir(result.checkpoint) as d:
        files = sorted(d.glob("member_*.safetensors"))
        states = [load_file(f) for f in files]
        metrics = [m for f in sorted(d.glob("metrics_rank*.json")) for m in json.loads(f.read_text())]
    ids = [int(f.stem.split("_")[1]) for f in files]
    if ids != list(range(cfg.reward.members)):
        raise RuntimeError(f"reward checkpoint {result.checkpoint.path} holds members {ids}, "
                           f"expected 0..{cfg.reward.members - 1}")
    net = STACKS[spec_kind(spec)][1].from_members(spec, ids, states)
    return net.eval(), sorted(metrics, key=lambda m: m["member"])

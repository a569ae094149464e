"""Image batch inference on Ray: the offline images (Ray Data) and the evaluation samples (Ray tasks).

Offline images: sampling from the pretrained SD and CLIP embedding, each on an actor pool (``map_batches`` with
``ActorPoolStrategy``: the models load once per actor), written to Parquet. The Parquet files are written by
the actors, on whichever nodes they run, so the target must be readable by the driver: a path under run.dir,
which on a multi-node cluster is a bucket (``check_storage`` stops a local one with the fix).

Evaluation: one Ray task per method, each with a GPU on a GPU cluster, reading the method's weights from
run.dir and returning its grid images and scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from braid_ray.config import Config, from_dict
from braid_ray.distributed import cluster
from braid_ray.distributed.workers import check_storage
from braid_ray.images.offline import EmbedBatch, SampleBatch, offline_requests


def actor_device() -> torch.device:
    """This Ray actor's or task's device: the GPU Ray gave it (CUDA_VISIBLE_DEVICES is that one), else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


class SampleOnActor(SampleBatch):
    """SampleBatch on the actor's own device."""

    def __init__(self, cfg: dict):
        super().__init__(cfg, device=str(actor_device()))


class EmbedOnActor(EmbedBatch):
    """EmbedBatch on the actor's own device."""

    def __init__(self, cfg: dict, image_column: str = "image"):
        super().__init__(cfg, device=str(actor_device()), image_column=image_column)


def _resources(cfg: Config) -> dict:
    """One GPU per actor or task with ``ray.use_gpu``, else a Train worker's CPU share; checked against the
    cluster (a request it can never grant would wait forever) unless ``ray.autoscaling`` leaves it to the autoscaler."""
    need = {"num_cpus": cfg.ray.cpus_per_worker} | ({"num_gpus": 1} if cfg.ray.use_gpu else {})
    key, amount = ("GPU", 1) if cfg.ray.use_gpu else ("CPU", cfg.ray.cpus_per_worker)
    have = ray.cluster_resources().get(key, 0)
    if not cfg.ray.autoscaling and have < amount:
        raise ValueError(f"ray: image batch inference needs {key}={amount:g} per actor, the cluster has {have:g}; "
                         "set ray.use_gpu=false or lower ray.cpus_per_worker (or set ray.autoscaling=true on an "
                         "autoscaling cluster)")
    return need


def _pool(cfg: Config, **kwargs) -> dict:
    """Actor-pool arguments: image.embed_actors actors, each with the CPU share (or one GPU) of a Train worker."""
    return {"compute": ray.data.ActorPoolStrategy(size=cfg.image.embed_actors),
            "fn_constructor_kwargs": {"cfg": cfg.to_dict(), **kwargs}, "batch_size": cfg.image.embed_batch_size,
            **_resources(cfg)}


def _write(ds: ray.data.Dataset, parquet_dir: str) -> None:
    # OVERWRITE: the files of an interrupted earlier attempt would otherwise be read back as duplicate rows
    ds.write_parquet(parquet_dir, mode=ray.data.SaveMode.OVERWRITE)


def sample_and_embed(cfg: Config, parquet_dir: str) -> pd.DataFrame:
    """Sample ``image.offline_images`` images from the pretrained model, embed them, write them as Parquet
    files under ``parquet_dir`` (a path or URI under run.dir) and return the table (id, prompt, seed, image,
    embedding, oracle)."""
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, parquet_dir)
    rows = offline_requests(cfg)
    ds = ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(len(rows["id"]))])
    _write(ds.map_batches(SampleOnActor, **_pool(cfg)).map_batches(EmbedOnActor, **_pool(cfg)), parquet_dir)
    return read_table(parquet_dir)


def embed_table(cfg: Config, table: pd.DataFrame, parquet_dir: str) -> pd.DataFrame:
    """Embed the encoded images of a user table (``image.image_column``) and write the result as Parquet."""
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, parquet_dir)
    _write(ray.data.from_pandas(table).map_batches(EmbedOnActor, **_pool(cfg, image_column=cfg.image.image_column)),
           parquet_dir)
    return read_table(parquet_dir)


def read_table(parquet_dir: str) -> pd.DataFrame:
    """The Parquet files Ray Data wrote, as one frame sorted by id, with embeddings as (D,) float32 arrays."""
    filesystem, root = pafs.FileSystem.from_uri(parquet_dir) if "://" in parquet_dir else (None, parquet_dir)
    frame = pq.read_table(root, filesystem=filesystem).to_pandas().sort_values("id").reset_index(drop=True)
    frame["embedding"] = [np.asarray(e, dtype=np.float32).reshape(-1) for e in frame["embedding"]]
    return frame


# (config, method, device) -> (grid pixels, scores): the image stage's evaluate_method, passed in so that this
# adapter does not import the stage that calls it.
EvaluateMethod = Callable[[Config, str, torch.device], tuple[np.ndarray, pd.DataFrame]]


def _evaluate_task(evaluate: EvaluateMethod, cfg: dict, method: str) -> tuple[np.ndarray, pd.DataFrame]:
    return evaluate(from_dict(cfg), method, actor_device())


def evaluate_on_ray(cfg: Config, methods: list[str], evaluate: EvaluateMethod) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """``evaluate`` (the image stage's ``evaluate_method``) for every method, each as a Ray task on its own GPU (or
    CPU share), in parallel; the tasks read the reward and the fine-tuned weights from run.dir."""
    cluster.init(cfg.ray, cfg.tracking.ray_logs)
    check_storage(cfg.ray, cfg.run.dir)
    task = ray.remote(**_resources(cfg))(_evaluate_task)
    return ray.get([task.remote(evaluate, cfg.to_dict(), m) for m in methods])

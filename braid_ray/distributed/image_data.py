"""Offline images by Ray Data batch inference: sampling from the pretrained SD and CLIP embedding, each on an
actor pool (``map_batches`` with ``ActorPoolStrategy``: the models load once per actor), written to Parquet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from braid_ray.config import Config
from braid_ray.distributed import cluster
from braid_ray.images.offline import EmbedBatch, SampleBatch, offline_requests


def _pool(cfg: Config) -> dict:
    """Actor-pool arguments: image.embed_actors actors, each with the CPU share (or one GPU) of a Train worker."""
    gpu = {"num_gpus": 1} if cfg.ray.use_gpu else {"num_cpus": cfg.ray.cpus_per_worker}
    return {"compute": ray.data.ActorPoolStrategy(size=cfg.image.embed_actors),
            "fn_constructor_kwargs": {"cfg": cfg.to_dict(), "device": "cuda" if cfg.ray.use_gpu else "cpu"},
            "batch_size": cfg.image.embed_batch_size, **gpu}


def sample_and_embed(cfg: Config, parquet_dir: str) -> pd.DataFrame:
    """Sample ``image.offline_images`` images from the pretrained model, embed them, write them as Parquet
    files under ``parquet_dir`` (local path or URI) and return the table (id, prompt, seed, image, embedding,
    oracle)."""
    cluster.init(cfg.ray)
    rows = offline_requests(cfg)
    ds = ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(len(rows["id"]))])
    ds = ds.map_batches(SampleBatch, **_pool(cfg)).map_batches(EmbedBatch, **_pool(cfg))
    ds.write_parquet(parquet_dir)
    return read_table(parquet_dir)


def embed_table(cfg: Config, table: pd.DataFrame, parquet_dir: str) -> pd.DataFrame:
    """Embed the encoded images of a user table (``image.image_column``) and write the result as Parquet."""
    cluster.init(cfg.ray)
    pool = _pool(cfg)
    pool["fn_constructor_kwargs"] = pool["fn_constructor_kwargs"] | {"image_column": cfg.image.image_column}
    ray.data.from_pandas(table).map_batches(EmbedBatch, **pool).write_parquet(parquet_dir)
    return read_table(parquet_dir)


def read_table(parquet_dir: str) -> pd.DataFrame:
    """The Parquet files Ray Data wrote, as one frame sorted by id, with embeddings as (D,) float32 arrays."""
    filesystem, root = pafs.FileSystem.from_uri(parquet_dir) if "://" in parquet_dir else (None, parquet_dir)
    frame = pq.read_table(root, filesystem=filesystem).to_pandas().sort_values("id").reset_index(drop=True)
    frame["embedding"] = [np.asarray(e, dtype=np.float32).reshape(-1) for e in frame["embedding"]]
    return frame

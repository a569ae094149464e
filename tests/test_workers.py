"""The shared Ray worker helpers that need no cluster: storage checks and the global-batch split."""

from __future__ import annotations

import pytest
import ray

from braid_ray.config import RayConfig
from braid_ray.distributed import workers
from braid_ray.finetune.run import share


def _nodes(monkeypatch, count: int) -> None:
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * count)


def test_a_local_run_dir_on_several_nodes_stops_with_the_fix(monkeypatch) -> None:
    _nodes(monkeypatch, 3)
    with pytest.raises(ValueError, match=r"local path /runs/x on 3 nodes.*s3://.*ray.shared_filesystem=true"):
        workers.check_storage(RayConfig(), "/runs/x")
    workers.check_storage(RayConfig(), "s3://bucket/runs/x")  # a bucket is fine
    workers.check_storage(RayConfig(shared_filesystem=True), "/mnt/nfs/runs/x")  # declared shared: fine


def test_a_local_run_dir_on_an_autoscaling_cluster_stops_even_with_one_node(monkeypatch) -> None:
    _nodes(monkeypatch, 1)
    workers.check_storage(RayConfig(), "/runs/x")  # one machine, not autoscaling: a laptop
    with pytest.raises(ValueError, match="autoscaling cluster"):
        workers.check_storage(RayConfig(autoscaling=True), "/runs/x")
    workers.check_storage(RayConfig(autoscaling=True), "s3://bucket/runs/x")


def test_an_uneven_global_batch_is_refused_with_the_fix() -> None:
    assert share(32, 4, "finetune.batch_size") == 8
    with pytest.raises(ValueError, match=r"finetune.batch_size=30 does not split evenly over 4 .*ray.num_workers=4"):
        share(30, 4, "finetune.batch_size")


def test_a_file_uri_is_a_local_path_too(monkeypatch) -> None:
    _nodes(monkeypatch, 2)
    with pytest.raises(ValueError, match="file:///runs/x on 2 nodes"):
        workers.check_storage(RayConfig(), "file:///runs/x")

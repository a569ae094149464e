"""The image pipeline through the one entry point: offline images, reward heads, fine-tuning, evaluation;
and the offline embeddings by Ray Data batch inference (an actor pool) into Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from braid_ray import pipeline
from braid_ray.images.offline import EmbedBatch, encode_png
from tests.test_images_sampler import tiny_cfg, tiny_reward_bytes

TINY_RUN = ["ray.num_workers=0", "image.offline_images=24", "image.embed_batch_size=12", "finetune.steps=2",
            "finetune.batch_size=2", "eval.n_samples=8", "eval.batch_size=8", "image.grid_images=4",
            "reward.epochs=5"]


def test_image_pipeline_end_to_end_in_process(tmp_path: Path) -> None:
    cfg = tiny_cfg(f"run.dir={tmp_path}", *TINY_RUN)
    summary = pipeline.run(cfg)
    text = pipeline.format_summary(summary)
    for label in ("| Pretrained | 8 |", "| STRL | 8 |", "| BRAID-Bonus | 8 |"):
        assert label in summary["eval"]
    assert "reward heads" in text and summary["data"]["rows"] == {"D": 24, "D_off": 12}
    d = pd.read_parquet(tmp_path / "data" / "d.parquet")
    assert len(d["embedding"].iloc[0]) == 768 and set(d["split"]) == {"off", "above"}
    assert (d.loc[d["split"] == "off", "y"].max() < d.loc[d["split"] == "above", "y"].min())
    for name in ("grid_pretrained.png", "grid_strl.png", "grid_braid_bonus.png", "scores.png", "reward_vs_oracle.png",
                 "report.md", "samples.parquet"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    assert (tmp_path / "finetune" / "braid_bonus" / "lora" / "pytorch_lora_weights.safetensors").exists()
    samples = pd.read_parquet(tmp_path / "eval" / "samples.parquet")
    assert samples.groupby("method").size().to_dict() == {"pretrained": 8, "strl": 8, "braid_bonus": 8}
    assert np.isfinite(samples[["oracle", "r_hat", "g_hat"]].to_numpy()).all()
    # Fine-tuned samples differ from the pretrained ones drawn with the same prompts and noise.
    by = {m: s["oracle"].to_numpy() for m, s in samples.groupby("method")}
    assert not np.array_equal(by["pretrained"], by["braid_bonus"])  # (by little: the UNet acts on the last K=2 steps)
    again = pipeline.run(cfg)  # every stage reused: the same table
    assert again["eval"] == summary["eval"]


@pytest.mark.slow  # a Ray Data actor pool
def test_ray_data_actor_pool_embeds_like_the_in_process_path(tmp_path: Path, ray_local) -> None:
    """Into a URI (the actors write the Parquet files wherever they run, so it is a bucket on clusters), twice:
    a re-run replaces the files of the first instead of adding duplicate rows."""
    from braid_ray.distributed.image_data import embed_table

    cfg = tiny_cfg("image.embed_batch_size=4", "image.embed_actors=1")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    table = pd.DataFrame({"id": np.arange(8), "image": [encode_png(p) for p in pixels], "score": np.arange(8.0)})
    embed_table(cfg, table, f"file://{tmp_path}/emb")
    out = embed_table(cfg, table, f"file://{tmp_path}/emb")
    written = list((tmp_path / "emb").iterdir())
    assert written and all(p.suffix == ".parquet" for p in written)
    assert out["id"].tolist() == list(range(8)) and out["score"].tolist() == list(np.arange(8.0))
    ref = EmbedBatch(cfg.to_dict())({"image": table["image"].to_numpy()})
    np.testing.assert_allclose(np.stack(out["embedding"]), ref["embedding"], atol=1e-6)
    np.testing.assert_allclose(out["oracle"].to_numpy(), ref["oracle"], atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(np.stack(out["embedding"])).norm(dim=-1), torch.ones(8))


def test_components_load_with_from_pretrained_from_a_local_folder(tmp_path: Path) -> None:
    """The hub code path (from_pretrained on a diffusers-layout folder), offline: the tiny model saved and reloaded."""
    from braid_ray.images.aesthetic import load_image_encoder
    from braid_ray.images.components import load_components, stock_pipeline

    tiny = load_components("tiny")
    stock_pipeline(tiny).save_pretrained(tmp_path / "sd")
    load_image_encoder("tiny").save_pretrained(tmp_path / "clip")
    loaded = load_components(str(tmp_path / "sd"))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.tokenizer("a red bird").input_ids == tiny.tokenizer("a red bird").input_ids
    assert loaded.scheduler.config.set_alpha_to_one is False and loaded.scheduler.config.steps_offset == 1
    clip = load_image_encoder(str(tmp_path / "clip"))
    assert not any(p.requires_grad for p in clip.parameters()) and clip.config.projection_dim == 768


def test_user_table_of_images_and_scores_becomes_d(tmp_path: Path) -> None:
    from braid_ray.images.stages import offline_stage
    from braid_ray.rundir import RunDir

    pixels = np.random.default_rng(1).integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)  # resized to 16 px
    table = pd.DataFrame({"png": [encode_png(p) for p in pixels], "rating": np.linspace(1.0, 7.0, 12)})
    table.to_parquet(tmp_path / "rated.parquet")
    table_key = f"image.offline_table={tmp_path / 'rated.parquet'}"
    cfg = tiny_cfg(f"run.dir={tmp_path / 'run'}", "ray.num_workers=0", table_key, "image.image_column=png",
                   "image.score_column=rating", "image.embed_batch_size=5")
    frame, summary, _ = offline_stage(cfg, RunDir(cfg.run.dir))
    assert frame["y"].tolist() == table["rating"].tolist() and summary["rows"] == {"D": 12, "D_off": 6}
    assert np.stack(frame["embedding"]).shape == (12, 768) and np.isfinite(frame["oracle"]).all()
    bad = tiny_cfg(f"run.dir={tmp_path / 'bad'}", "ray.num_workers=0", table_key)
    with pytest.raises(ValueError, match="no column 'image'"):
        offline_stage(bad, RunDir(bad.run.dir))


@pytest.mark.slow  # one Ray task per method
def test_evaluation_as_ray_tasks_reads_run_dir_and_matches_in_process(tmp_path: Path, ray_local) -> None:
    """The GPU-cluster evaluation path (one Ray task per method), here on CPU shares: each task reads the reward
    and the method's weights from run.dir (a URI) and samples what the in-process evaluation samples."""
    from braid_ray.distributed.image_data import evaluate_on_ray
    from braid_ray.images.finetune import build_policy
    from braid_ray.images.stages import evaluate_method, trainable_weights
    from braid_ray.rundir import RunDir
    from safetensors.torch import save as save_safetensors

    cfg = tiny_cfg(f"run.dir=file://{tmp_path}/run", "eval.n_samples=4", "eval.batch_size=2", "image.grid_images=3",
                   "finetune.methods=[strl]")
    run = RunDir(cfg.run.dir)
    run.stage("reward").write_bytes("reward.safetensors", tiny_reward_bytes(cfg))
    weights = trainable_weights(build_policy(cfg, torch.device("cpu")).state_dict(), lora=True)
    run.stage("finetune/strl").write_bytes("trainable_fp32.safetensors", save_safetensors(weights))
    on_ray = evaluate_on_ray(cfg, ["pretrained", "strl"], evaluate_method)
    for method, (pixels, scores) in zip(["pretrained", "strl"], on_ray):
        here_pixels, here = evaluate_method(cfg, method, torch.device("cpu"))
        assert pixels.shape == here_pixels.shape == (3, 16, 16, 3) and len(scores) == 4
        assert np.abs(pixels.astype(int) - here_pixels).max() <= 1
        assert scores["method"].eq(method).all() and scores["prompt"].tolist() == here["prompt"].tolist()
        np.testing.assert_allclose(scores[["oracle", "r_hat", "g_hat"]], here[["oracle", "r_hat", "g_hat"]], atol=1e-4)


def test_a_local_run_dir_on_several_nodes_stops_every_image_stage_that_writes_from_workers(
        tmp_path: Path, ray_local, monkeypatch) -> None:
    import ray

    from braid_ray.distributed.image_data import embed_table, evaluate_on_ray, sample_and_embed
    from braid_ray.images.stages import evaluate_method
    from braid_ray.distributed.images import finetune_images_on_ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])  # as on a 2-node cluster
    cfg = tiny_cfg(f"run.dir={tmp_path}")
    table = pd.DataFrame({"id": [0], "image": [encode_png(np.zeros((16, 16, 3), np.uint8))]})
    for stage in (lambda: sample_and_embed(cfg, str(tmp_path / "data")), lambda: embed_table(cfg, table, str(tmp_path)),
                  lambda: finetune_images_on_ray(cfg, "strl", b"", str(tmp_path / "ray"), "strl"),
                  lambda: evaluate_on_ray(cfg, ["pretrained"], evaluate_method)):
        with pytest.raises(ValueError, match="on 2 nodes: .* Set run.dir to a bucket"):
            stage()
    assert list(tmp_path.iterdir()) == []  # stopped before anything was written


def test_the_pipeline_hands_the_image_stages_their_ray_runners() -> None:
    """ray.num_workers > 0: Ray Data, Ray Train + ZeRO, and (GPU clusters only) Ray tasks for the evaluation;
    ray.num_workers=0: everything in this process."""
    from braid_ray.distributed import image_data, images
    from braid_ray.images.stages import IN_PROCESS

    assert pipeline.image_runners(tiny_cfg("ray.num_workers=0")) is IN_PROCESS
    cpu = pipeline.image_runners(tiny_cfg("ray.num_workers=2"))
    assert cpu.sample_and_embed is image_data.sample_and_embed and cpu.embed_table is image_data.embed_table
    assert cpu.finetune is images.finetune_images_on_ray and cpu.evaluate is None
    assert pipeline.image_runners(tiny_cfg("ray.num_workers=2", "ray.use_gpu=true")).evaluate is not None

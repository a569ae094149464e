"""The image pipeline (``domain: image``): offline images -> reward heads -> fine-tuning (each method) -> evaluation.

As for sequences, every stage records its config and inputs in the run directory and is reused when they
are unchanged. The work that can run on Ray comes in as ``ImageRunners`` (``braid_ray.pipeline.image_runners``
builds them from the adapters in ``braid_ray.distributed``: Ray Data for the offline images, Ray Train + DeepSpeed
ZeRO for fine-tuning, and on a GPU cluster one Ray task per method for the evaluation); without them every stage
runs in this process, on ``run.device``.

D is a set of images with labels y: sampled from the pretrained model and scored by the oracle head (plus
``image.label_noise``), or read from ``image.offline_table``. D_off = the rows below the ``data.quantile``
quantile of y; the reward heads see only D_off, the oracle judges every method's samples.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from braid_ray.config import Config
from braid_ray.data.splits import below_quantile
from braid_ray.devices import resolve_device
from braid_ray.eval.plots import score_distributions
from braid_ray.eval.report import to_markdown
from braid_ray.eval.stats import pearson
from braid_ray.finetune.loop import drive, finetune_record_drop, tracking_sinks, write_finetune_summary
from braid_ray.images import evaluate as ev
from braid_ray.images.export import LORA_WEIGHT_NAME, lora_only, save_lora_for_diffusers, unet_weights
from braid_ray.images.finetune import ImageFineTuner, build_policy, load_image_reward
from braid_ray.images.heads import fit_reward_heads
from braid_ray.images.offline import EmbedBatch, SampleBatch, offline_requests, pretrained_policy, run_in_process
from braid_ray.images.settings import DEFAULT_QUANTILE
from braid_ray.methods import METHODS, label
from braid_ray.reward.conservative import PENALTIES, ConservativeReward
from braid_ray.reward.fit import score
from braid_ray.rundir import RunDir, file_sha256, fingerprint, stage_record

log = logging.getLogger(__name__)

STAGES = ("data", "reward", "finetune", "eval")
# image keys a fine-tuning run does not read (their effect on D reaches it through the reward's fingerprint)
EVAL_ONLY = ("grid_images", "embed_batch_size", "embed_actors")


@dataclass(frozen=True)
class ImageRunners:
    """The image stages' work that runs elsewhere (on Ray); each None runs in this process."""
    sample_and_embed: Callable[[Config, str], pd.DataFrame] | None = None  # (cfg, scratch uri) -> D
    embed_table: Callable[[Config, pd.DataFrame, str], pd.DataFrame] | None = None  # (cfg, table, scratch uri) -> D
    finetune: Callable[[Config, str, bytes, str, str], tuple[dict, list[dict]]] | None = None
    evaluate: Callable[[Config, list[str]], list[tuple[np.ndarray, pd.DataFrame]]] | None = None


IN_PROCESS = ImageRunners()


def _local_or_uri(run: RunDir, stage: str, name: str) -> str:
    return str(run.stage(stage).local_path(name)) if run.is_local() else f"{run.uri}/{stage}/{name}"


# ---------------------------------------------------------------------------------------------
# Offline images


def offline_stage(cfg: Config, run: RunDir, runners: ImageRunners = IN_PROCESS) -> tuple[pd.DataFrame, dict, str]:
    """D: images with CLIP embeddings, oracle scores and labels y, split into D_off and the rest."""
    im = cfg.image
    q = cfg.data.quantile if cfg.data.quantile is not None else DEFAULT_QUANTILE
    keys = ("model", "revision", "clip_model", "oracle", "resolution", "prompts", "guidance_scale", "offline_images",
            "offline_table", "image_column", "score_column", "label_noise",
            "embed_batch_size")  # a sampling batch shares one generator
    record = stage_record(cfg, image={k: getattr(im, k) for k in keys},
                          diffusion={"steps": cfg.diffusion.steps, "eta": cfg.diffusion.eta}, quantile=q,
                          inputs={Path(im.offline_table).name: file_sha256(im.offline_table)} if im.offline_table
                          else {})
    stage = run.stage("data")

    def make() -> None:
        start = time.perf_counter()
        frame = _user_table(cfg, run, runners) if im.offline_table else _sampled_table(cfg, run, runners)
        y = frame["y"].to_numpy()
        off, threshold = below_quantile(y, q, f"{run.uri}/data")
        frame["split"] = np.where(off, "off", "above")
        summary = {"rows": {"D": len(frame), "D_off": int(off.sum())}, "quantile": q, "threshold": threshold,
                   "best_offline_y": float(y[off].max()), "best_offline_oracle": float(frame["oracle"][off].max()),
                   "oracle_mean": float(frame["oracle"].mean()), "source": im.offline_table or "pretrained samples",
                   "seconds": time.perf_counter() - start}
        stage.write_parquet("d.parquet", frame.assign(embedding=[e.tolist() for e in frame["embedding"]]))
        stage.write_json("summary.json", summary)
        log.info("data: %d images, D_off %d (y < %.4f), in %.1f s", len(frame), off.sum(), threshold,
                 summary["seconds"])

    stage.once(record, cfg, make, lambda: None)
    return stage.read_parquet("d.parquet"), stage.read_json("summary.json"), fingerprint(record)


def _sampled_table(cfg: Config, run: RunDir, runners: ImageRunners) -> pd.DataFrame:
    log.info("data: sampling %d images from %s and embedding them with %s", cfg.image.offline_images,
             cfg.image.model, cfg.image.clip_model)
    if runners.sample_and_embed is not None:
        frame = runners.sample_and_embed(cfg, _local_or_uri(run, "data", "batch_inference"))
    else:
        bs = cfg.image.embed_batch_size
        rows = run_in_process(SampleBatch(cfg.to_dict()), offline_requests(cfg), bs)
        frame = _frame(run_in_process(EmbedBatch(cfg.to_dict()), rows, bs))
    noise = np.random.default_rng([cfg.run.seed, 11]).normal(0.0, cfg.image.label_noise, len(frame))
    return frame.assign(y=frame["oracle"].to_numpy() + noise)


def _user_table(cfg: Config, run: RunDir, runners: ImageRunners) -> pd.DataFrame:
    im = cfg.image
    table = pd.read_parquet(im.offline_table)
    for col in (im.image_column, im.score_column):
        if col not in table.columns:
            raise ValueError(f"{im.offline_table}: no column {col!r} (image.image_column / image.score_column); "
                             f"columns: {list(table.columns)}")
    y = pd.to_numeric(table[im.score_column], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"{im.offline_table}: row {bad}: column {im.score_column!r} is not a finite number")
    table = table.assign(id=np.arange(len(table)), y=y)
    if runners.embed_table is not None:
        return runners.embed_table(cfg, table, _local_or_uri(run, "data", "batch_inference"))
    return _frame(run_in_process(EmbedBatch(cfg.to_dict(), image_column=im.image_column),
                                 {c: table[c].to_numpy() for c in table.columns}, im.embed_batch_size))


def _frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Batch-inference columns as a frame, one (D,) embedding array per row."""
    return pd.DataFrame({k: (list(v) if k == "embedding" else v) for k, v in columns.items()})


# ---------------------------------------------------------------------------------------------
# Reward heads


def reward_stage(cfg: Config, run: RunDir, data: pd.DataFrame, data_fp: str) -> ConservativeReward:
    """Bootstrap MLP members on D_off's embeddings; conservative modes and a small calibration report."""
    stage = run.stage("reward")

    def make() -> ConservativeReward:
        emb = np.stack(data["embedding"].map(lambda e: np.asarray(e, np.float32)))
        off = (data["split"] == "off").to_numpy()
        y = data["y"].to_numpy()
        reward, rd, metrics = fit_reward_heads(cfg.reward, emb[off], y[off], cfg.run.seed)
        held = np.flatnonzero(off)[rd.holdout]
        above = np.flatnonzero(~off)
        report = {}
        for penalty in PENALTIES:
            r_in, g_in = score(reward, emb[held], penalty)
            r_out, g_out = score(reward, emb[above], penalty) if above.size else (np.zeros(0), np.zeros(0))
            report[penalty] = {"rmse_in": float(np.sqrt(np.mean((r_in - y[held]) ** 2))),
                               "pearson_in": pearson(r_in, y[held], min_rows=3),
                               "mean_g_in": float(g_in.mean()),
                               "mean_g_above": float(g_out.mean()) if above.size else None,
                               "mean_r_above": float(r_out.mean()) if above.size else None,
                               "mean_y_above": float(y[above].mean()) if above.size else None}
        stage.write_bytes("reward.safetensors", reward.to_bytes({"members": metrics, "config": cfg.to_dict()}))
        stage.write_json("calibration.json", report)
        return reward

    return stage.once(stage_record(cfg, ["reward"], {"data": data_fp}), cfg, make,
                      lambda: stage.load("reward.safetensors", ConservativeReward.from_bytes))


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def trainable_weights(policy_state: dict[str, torch.Tensor], lora: bool) -> dict[str, torch.Tensor]:
    """What a method learned, as UNet weights: the LoRA entries, or the whole UNet under full fine-tuning."""
    unet = unet_weights(policy_state)
    return lora_only(unet) if lora else unet


def finetune_stage(cfg: Config, run: RunDir, method: str, upstream: dict[str, str],
                   runners: ImageRunners = IN_PROCESS) -> pd.DataFrame:
    """Fine-tune with ``method``'s conservative reward; export fp32 weights (and LoRA weights for diffusers)."""
    image = {k: v for k, v in cfg.section("image")["image"].items() if k not in EVAL_ONLY}
    record = stage_record(cfg, ["finetune", "diffusion", "deepspeed"], upstream, drop=finetune_record_drop(cfg),
                          method=method, image=image)
    stage = run.stage(f"finetune/{method}")

    def make() -> None:
        reward_bytes = run.stage("reward").read_bytes("reward.safetensors")
        start = time.perf_counter()
        lora = cfg.image.lora_rank > 0
        if runners.finetune is not None:
            state, rows = runners.finetune(cfg, method, reward_bytes, _local_or_uri(run, f"finetune/{method}", "ray"),
                                           f"{method}-seed{cfg.run.seed}")
        else:
            state, rows = _finetune_in_process(cfg, run, method, reward_bytes)
        weights = trainable_weights(state, lora)
        stage.write_bytes("trainable_fp32.safetensors", save_safetensors({k: v.float().contiguous() for k, v in
                                                                          weights.items()}))
        if lora:
            with tempfile.TemporaryDirectory() as tmp:
                save_lora_for_diffusers(unet_weights(state), tmp)
                blob = (Path(tmp) / LORA_WEIGHT_NAME).read_bytes()
                run.stage(f"finetune/{method}/lora").write_bytes(LORA_WEIGHT_NAME, blob)
        stage.write_parquet("history.parquet", pd.DataFrame(rows))
        write_finetune_summary(cfg, stage, method, rows, time.perf_counter() - start)

    stage.once(record, cfg, make, lambda: None)
    return stage.read_parquet("history.parquet")


def _finetune_in_process(cfg: Config, run: RunDir, method: str, reward_bytes: bytes
                         ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The fine-tuning driver in this process, on ``run.device``; returns the policy's weights and the history."""
    device = resolve_device(cfg.run.device)
    policy = build_policy(cfg, device)
    tuner = ImageFineTuner(policy, load_image_reward(cfg, reward_bytes, method, device), cfg, seed=cfg.run.seed,
                           device=device)
    ft = cfg.finetune
    sinks = tracking_sinks(cfg.tracking, str(run.stage("").local_path()) if run.is_local() else None,
                           f"fine-tune {method}", f"finetune/{method}", ft.steps, ft.log_every)
    history = drive(tuner, ft.steps, sinks=sinks, plateau=(ft.plateau_window, ft.plateau_tol))
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}, history


# ---------------------------------------------------------------------------------------------
# Evaluation


def _method_policy(cfg: Config, run: RunDir, method: str, device: torch.device):
    if method == "pretrained":
        return pretrained_policy(cfg, device)
    policy = build_policy(cfg, device)
    weights = run.stage(f"finetune/{method}").load("trainable_fp32.safetensors", load_safetensors)
    if cfg.image.lora_rank > 0:  # back to peft's names (adapter "default") inside the policy's UNet
        weights = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                   for k, v in weights.items()}
    missing = set(weights) - set(policy.unet.state_dict())
    if missing:
        raise ValueError(f"finetune/{method}/trainable_fp32.safetensors: {len(missing)} weights the UNet does not "
                         f"have, e.g. {sorted(missing)[:2]}")
    policy.unet.load_state_dict(weights, strict=False)
    return policy.eval()


def evaluate_method(cfg: Config, method: str, device: torch.device) -> tuple[np.ndarray, pd.DataFrame]:
    """``eval.n_samples`` images of ``method`` on ``device`` (the same prompts and noise for every method): the
    first ``image.grid_images`` of them (N, H, W, 3) uint8, and every image's scores. Reads run.dir only, so it
    runs as well in a Ray task on another node (run.dir a bucket there)."""
    run = RunDir(cfg.run.dir)
    reward_bytes = run.stage("reward").read_bytes("reward.safetensors")
    reward = load_image_reward(cfg, reward_bytes, method if method in METHODS else "strl", device)
    prompts = ev.eval_prompts(cfg.image.prompts, cfg.eval.n_samples)
    pixels, scores = ev.sample_and_score(_method_policy(cfg, run, method, device), reward, prompts,
                                         cfg.run.seed + 99, cfg.eval.batch_size)
    return pixels[:cfg.image.grid_images], scores.assign(method=method)


def evaluate_stage(cfg: Config, run: RunDir, summary: dict, histories: dict[str, pd.DataFrame],
                   runners: ImageRunners = IN_PROCESS) -> pd.DataFrame:
    """Sample eval.n_samples images per method (same prompts and seeds), score them, draw the figures; guarded
    like every stage (a changed eval config or method list is a conflict, never a silent replacement).

    On a GPU cluster (``ray.num_workers > 0`` and ``ray.use_gpu``) each method samples in a Ray task with a GPU;
    otherwise here, on ``run.device``."""
    stage = run.stage("eval")
    upstream = run.fingerprints(["data", "reward", *(f"finetune/{m}" for m in cfg.finetune.methods)])
    record = stage_record(cfg, ["eval"], upstream, methods=list(cfg.finetune.methods),
                          image={k: getattr(cfg.image, k) for k in EVAL_ONLY})
    return stage.once(record, cfg, lambda: _evaluate(cfg, run, summary, histories, runners),
                      lambda: pd.DataFrame(stage.read_json("metrics.json")))


def _evaluate(cfg: Config, run: RunDir, summary: dict, histories: dict[str, pd.DataFrame],
              runners: ImageRunners) -> pd.DataFrame:
    stage = run.stage("eval")
    methods = ["pretrained", *cfg.finetune.methods]
    if runners.evaluate is not None:
        results = runners.evaluate(cfg, methods)
    else:
        device = resolve_device(cfg.run.device)
        results = [evaluate_method(cfg, m, device) for m in methods]
    frames, grids = [], {}
    for method, (pixels, scores) in zip(methods, results):
        frames.append(scores)
        grids[method] = (pixels, scores["oracle"].to_numpy()[:len(pixels)])
        log.info("eval %s: oracle mean %.4f over %d images", method, scores["oracle"].mean(), len(scores))
    samples = pd.concat(frames, ignore_index=True)
    table = ev.summary_table(samples, summary["best_offline_oracle"])
    with tempfile.TemporaryDirectory() as tmp:
        files = [ev.sample_grid(p, s, label(m), Path(tmp) / f"grid_{m}.png") for m, (p, s) in grids.items()]
        by_method = {label(m): s["oracle"].to_numpy() for m, s in samples.groupby("method", sort=False)}
        files.append(score_distributions(by_method, summary["best_offline_oracle"], Path(tmp) / "scores.png",
                                         f"oracle ({cfg.image.oracle}) scores, {cfg.eval.n_samples} images per method",
                                         ylabel="aesthetic score"))
        if histories:
            files.append(ev.reward_vs_oracle(histories, Path(tmp) / "reward_vs_oracle.png"))
        for f in files:
            stage.write_bytes(f.name, f.read_bytes())
    stage.write_parquet("samples.parquet", samples)
    stage.write_json("metrics.json", table.to_dict(orient="records"))
    stage.write_text("report.md", report_markdown(cfg, summary, table))
    return table


def report_markdown(cfg: Config, summary: dict, table: pd.DataFrame) -> str:
    lines = [f"# Images: {cfg.image.model} with the {cfg.image.oracle} oracle", "",
             f"D: {summary['rows']['D']} images ({summary['source']}); D_off: {summary['rows']['D_off']} below the "
             f"{summary['quantile']:.2f} quantile of y; best offline oracle score "
             f"{summary['best_offline_oracle']:.4f}.",
             "", table_markdown(table), "",
             "Figures: `grid_<method>.png` (samples with their oracle scores), `scores.png` (oracle scores per "
             "method), `reward_vs_oracle.png` (r_hat and the oracle over fine-tuning)."]
    return "\n".join(lines) + "\n"


def table_markdown(table: pd.DataFrame) -> str:
    cols = ["method", "images", "oracle_median", "oracle_mean", "oracle_p90", "oracle_max", "above_best_offline",
            "r_hat", "g_hat"]
    return to_markdown(table[cols])


# ---------------------------------------------------------------------------------------------


def run_images(cfg: Config, stages: tuple[str, ...] = STAGES, runners: ImageRunners = IN_PROCESS) -> dict:
    """All image stages for ``cfg`` (earlier ones reused when unchanged); returns what the launch script prints."""
    run = RunDir(cfg.run.dir)
    data, summary, data_fp = offline_stage(cfg, run, runners)
    out: dict = {"domain": "image", "run_dir": run.uri, "data": summary}
    if "reward" in stages or "finetune" in stages:
        reward_stage(cfg, run, data, data_fp)
        out["reward"] = run.stage("reward").read_json("calibration.json")
    histories = {}
    if "finetune" in stages:
        upstream = {"reward": run.stage("reward").read_json("stage.json")["fingerprint"]}
        for method in cfg.finetune.methods:
            histories[method] = finetune_stage(cfg, run, method, upstream, runners)
    if "eval" in stages:
        out["eval"] = table_markdown(evaluate_stage(cfg, run, summary, histories, runners))
    run.stage("").write_yaml("config.yaml", cfg.to_dict())  # only once every stage has accepted the config
    return out


def format_summary(summary: dict) -> str:
    d = summary["data"]
    lines = [f"images      {d['rows']['D']} ({d['source']}), D_off {d['rows']['D_off']} (y < {d['threshold']:.4f})",
             f"run dir     {summary['run_dir']}",
             f"best D_off  oracle {d['best_offline_oracle']:.4f}; mean oracle over D {d['oracle_mean']:.4f}"]
    if "reward" in summary:
        lines += ["", "reward heads (in = held-out D_off rows; above = rows above the offline quantile):",
                  "| penalty | RMSE in | Pearson in | mean g in | mean g above |", "|---|---|---|---|---|"]
        for p, r in summary["reward"].items():
            above = "-" if r["mean_g_above"] is None else f"{r['mean_g_above']:.4f}"
            lines.append(f"| {p} | {r['rmse_in']:.4f} | {r['pearson_in']:.4f} | {r['mean_g_in']:.4f} | {above} |")
    if "eval" in summary:
        lines += ["", f"images scored by the oracle (report: {summary['run_dir']}/eval/report.md):", summary["eval"]]
    return "\n".join(lines)


"""Building a FineTuner from a run directory, and its checkpoint files (safetensors + weights-only torch)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from braid_ray.config import Config
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.finetune.trainer import METHODS, FineTuner, Monitor
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.rundir import RunDir


@dataclass
class FinetuneJob:
    """What one fine-tuning run needs besides the config: where its inputs are, and which method it is."""

    run_dir: str
    method: str  # a key of METHODS
    length: int  # sequence length L


def load_pretrained(cfg: Config, run_dir: str, length: int) -> torch.nn.Module:
    model = build_denoiser(cfg.diffusion, length)
    model.load_state_dict(load_safetensors(RunDir(run_dir).stage("pretrain").read_bytes("denoiser.safetensors")))
    return model.eval()


def load_reward(run_dir: str, penalty: str, strength: float) -> ConservativeReward:
    return ConservativeReward.from_bytes(RunDir(run_dir).stage("reward").read_bytes("reward.safetensors"),
                                         penalty=penalty, strength=strength)


def build_finetuner(cfg: Config, job: FinetuneJob, seed: int,
                    grad_sync: Callable[[list[torch.Tensor]], None] | None = None) -> FineTuner:
    ft = cfg.finetune
    backbone = build_backbone(cfg.diffusion, job.length, ft.temperature, ft.straight_through)
    torch.manual_seed(cfg.run.seed)  # the same initial trainable weights on every worker
    policy = FineTunedPolicy(backbone, load_pretrained(cfg, job.run_dir, job.length), ft.parameterization)
    reward = load_reward(job.run_dir, METHODS[job.method], ft.strength)

    def reward_fn(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reward(backbone.reward_input(x0))

    return FineTuner(policy, reward_fn, alpha=ft.alpha, k=ft.k, batch_size=_share(ft.batch_size), lr=ft.lr,
                     steps=ft.steps, clip=ft.clip, grad_accum=ft.grad_accum, randomize_k=ft.randomize_k,
                     reward_scale=reward.stats.y_std, seed=seed, grad_sync=grad_sync,
                     monitor=oracle_monitor(cfg, job.run_dir) if ft.monitor_queries > 0 else None,
                     monitor_every=ft.monitor_every, monitor_queries=_share(ft.monitor_queries))


def oracle_monitor(cfg: Config, run_dir: str) -> Monitor:
    """The task's oracle, from the (finished) data and oracle stages of ``run_dir``: for monitoring only."""
    from braid_ray.stages import data_stage, oracle_stage  # stages builds fine-tuners: import here, not above

    run = RunDir(run_dir)
    return oracle_stage(cfg, run, data_stage(cfg, run)).score


def _share(total: int) -> int:
    """This worker's share of a global count (the batch, the oracle budget) when data-parallel."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return max(1, total // world) if total > 0 else 0


def trainer_state_files(tuner: FineTuner, history: list[dict]) -> dict[str, bytes]:
    """A resumable checkpoint: weights as safetensors; optimizer, schedule and RNG as a weights-only torch file."""
    state = tuner.state_dict()
    buf = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k != "trainable"}, buf)
    return {"trainable.safetensors": save_safetensors({k: v.contiguous() for k, v in state["trainable"].items()}),
            "trainer_state.pt": buf.getvalue(), "history.json": json.dumps(history).encode()}


def load_trainer_state(tuner: FineTuner, directory: Path) -> list[dict]:
    """Restore a FineTuner from ``trainer_state_files`` written to ``directory``; returns the history so far."""
    state = torch.load(directory / "trainer_state.pt", weights_only=True)  # no unpickling of arbitrary objects
    state["trainable"] = load_safetensors((directory / "trainable.safetensors").read_bytes())
    tuner.load_state_dict(state)
    return json.loads((directory / "history.json").read_text())


def read_checkpoint(directory: Path) -> tuple[dict, list[dict]]:
    """(trainable weights, history) from a fine-tuning checkpoint directory."""
    directory = Path(directory)
    state = load_safetensors((directory / "trainable.safetensors").read_bytes())
    return state, json.loads((directory / "history.json").read_text())

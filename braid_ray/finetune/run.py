"""Building a FineTuner from a run directory, and its checkpoint files (safetensors + weights-only torch)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from braid_ray.config import Config
from braid_ray.diffusion.pretrain import Backbone, build_backbone, build_denoiser
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.finetune.trainer import FineTuner, Monitor
from braid_ray.methods import METHODS
from braid_ray.reward.conservative import ConservativeReward
from braid_ray.rundir import RunDir


@dataclass
class FinetuneJob:
    """What one fine-tuning run needs besides the config: where its inputs are, and which method it is."""

    run_dir: str
    method: str  # a key of METHODS
    length: int  # sequence length L


def load_pretrained(cfg: Config, run_dir: str, length: int,
                    device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    model = build_denoiser(cfg.diffusion, length)
    model.load_state_dict(load_safetensors(RunDir(run_dir).stage("pretrain").read_bytes("denoiser.safetensors")))
    return model.to(device).eval()


def fine_tuned_policy(cfg: Config, backbone: Backbone, pretrained: torch.nn.Module) -> FineTunedPolicy:
    """The policy ``finetune`` trains and the evaluation samples: the parameterisation, and the steps where the
    correction is off (before the last K with ``early_steps: pretrained``; the last ``pretrained_last_steps``)."""
    ft = cfg.finetune
    return FineTunedPolicy(backbone, pretrained, ft.parameterization,
                           active_steps=ft.k if ft.early_steps == "pretrained" else None,
                           pretrained_last=ft.pretrained_last_steps)


def load_reward(run_dir: str, penalty: str, strength: float,
                device: torch.device = torch.device("cpu")) -> ConservativeReward:
    reward = ConservativeReward.from_bytes(RunDir(run_dir).stage("reward").read_bytes("reward.safetensors"),
                                           penalty=penalty, strength=strength)
    return reward.to(device)


def build_finetuner(cfg: Config, job: FinetuneJob, seed: int, device: torch.device | None = None,
                    world_size: int = 1, grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
                    monitor: Monitor | None = None) -> FineTuner:
    """A FineTuner for ``job`` with every model, buffer and generator on ``device`` (default: the CPU).

    ``world_size`` data-parallel workers share the global ``finetune.batch_size`` and oracle budget (an uneven
    split is refused); ``seed`` is this worker's sampler noise, while the initial weights and the K of each
    step come from ``run.seed`` alone, so they are the same on every worker.
    """
    ft = cfg.finetune
    device = device or torch.device("cpu")
    backbone = build_backbone(cfg.diffusion, job.length, ft.temperature, ft.straight_through)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)  # the same initial trainable weights on every worker
        policy = fine_tuned_policy(cfg, backbone, load_pretrained(cfg, job.run_dir, job.length, device))
    policy = policy.to(device)
    reward = load_reward(job.run_dir, METHODS[job.method].penalty, ft.strength, device)

    def reward_fn(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reward(backbone.reward_input(x0))

    return FineTuner(policy, reward_fn, alpha=ft.alpha, k=ft.k,
                     batch_size=share(ft.batch_size, world_size, "finetune.batch_size"), lr=ft.lr,
                     steps=ft.steps, clip=ft.clip, grad_accum=ft.grad_accum, randomize_k=ft.randomize_k,
                     reward_scale=reward.stats.y_std, seed=seed, k_seed=cfg.run.seed, device=device,
                     grad_sync=grad_sync, monitor=monitor, monitor_every=ft.monitor_every,
                     monitor_queries=share(ft.monitor_queries, world_size, "finetune.monitor_queries"))


def share(total: int, world_size: int, key: str) -> int:
    """This worker's share of a global count (the batch, the oracle budget) over ``world_size`` workers."""
    if total % world_size:
        raise ValueError(f"{key}={total} does not split evenly over {world_size} data-parallel workers; make it a "
                         f"multiple of ray.num_workers={world_size}")
    return total // world_size


def trainer_state_files(tuner: FineTuner, history: list[dict]) -> dict[str, bytes]:
    """A resumable checkpoint: weights as safetensors; optimizer, schedule and RNG as a weights-only torch file."""
    state = tuner.state_dict()
    buf = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k != "trainable"}, buf)
    return {"trainable.safetensors": save_safetensors({k: v.contiguous() for k, v in state["trainable"].items()}),
            "trainer_state.pt": buf.getvalue(), "history.json": json.dumps(history).encode()}


def load_trainer_state(tuner: FineTuner, directory: Path) -> list[dict]:
    """Restore a FineTuner from ``trainer_state_files`` written to ``directory``; returns the history so far."""
    # weights-only: no unpickling of arbitrary objects; tensors load to the CPU and Adam's state follows its
    # parameters' device in load_state_dict (the generators' states must be CPU byte tensors)
    state = torch.load(directory / "trainer_state.pt", weights_only=True, map_location="cpu")
    state["trainable"] = load_safetensors((directory / "trainable.safetensors").read_bytes())
    tuner.load_state_dict(state)
    return json.loads((directory / "history.json").read_text())


def read_checkpoint(directory: Path) -> tuple[dict, list[dict]]:
    """(trainable weights, history) from a fine-tuning checkpoint directory."""
    directory = Path(directory)
    state = load_safetensors((directory / "trainable.safetensors").read_bytes())
    return state, json.loads((directory / "history.json").read_text())

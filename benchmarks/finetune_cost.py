"""What one fine-tuning step costs, against what it must cost (issue 4).

1. Step time against its floor. A step samples T denoising steps, backpropagates through the last K, and pays
   the KL of the T - K earlier steps at their detached x_t (the whole path's KL): the floor is T graph-free
   policy calls, K forward+backward policy calls and T - K forward+backward calls of the correction network
   alone, each timed on its own at the same batch. The step also pays activation checkpointing (one extra
   forward per differentiable step), the reward model and Adam. Target: step <= 1.3 x floor.
2. Peak memory at T=50 against T=100 with the same K: each measured in a fresh process as the growth of
   the peak resident set over the resident set after building the models. Target: within 10%. A control
   at T=50 with 2K differentiable steps shows that the measure sees activation memory when it does grow.
   The children run with MALLOC_MMAP_THRESHOLD_=65536: by default glibc raises its mmap threshold as
   large blocks are freed and then keeps freed activations in the heap, so the peak RSS of the same run
   varied by +-150 MB between processes (T=20/50/100/200 measured 651/389/614/341 MB); with a fixed
   threshold large tensors are unmapped when freed and the peak RSS tracks the live tensors.

    .venv/bin/python benchmarks/finetune_cost.py            # both parts; writes results/finetune_cost.json
    .venv/bin/python benchmarks/finetune_cost.py --backbones    # part 3; writes results/backbone_step.json

3. The two backbones side by side (issue 15): one whole fine-tuning step of each sequence preset (tfbind8,
   utr_mrl and their masked twins, each at its own T and K: the Gaussian presets backpropagate through K = 20 of
   50 steps, the masked ones through all 50) at the same batch, threads and load, one after the other.

The denoiser and reward are each preset's (configs/<preset>.yaml; parts 1 and 2: tfbind8), untrained: cost does
not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from braid_ray.config import load_config
from braid_ray.diffusion.pretrain import build_backbone, build_denoiser
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.finetune.trainer import FineTuner
from braid_ray.reward.conservative import ConservativeReward, RewardStats
from braid_ray.reward.fit import stack_spec
from braid_ray.reward.stacked import StackedNet

ROOT = Path(__file__).resolve().parents[1]

LENGTH = 8  # TFBind8
PRESETS = {"tfbind8": 8, "tfbind8_masked": 8, "utr_mrl": 50, "utr_mrl_masked": 50}  # preset: sequence length


def build(steps: int | None, k: int | None, batch: int, penalty: str = "bonus", preset: str = "tfbind8") -> FineTuner:
    """A FineTuner of ``preset``'s models (untrained), at T = ``steps`` and K = ``k`` (None: the preset's)."""
    length = PRESETS[preset]
    overrides = [f"diffusion.steps={steps}"] * (steps is not None) + [f"finetune.k={k}"] * (k is not None)
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", overrides)
    k = cfg.finetune.k
    torch.manual_seed(0)
    backbone = build_backbone(cfg.diffusion, length, cfg.finetune.temperature, cfg.finetune.straight_through)
    policy = FineTunedPolicy(backbone, build_denoiser(cfg.diffusion, length), cfg.finetune.parameterization)
    net = StackedNet(stack_spec(cfg.reward, length), list(range(cfg.reward.members)), seed=0)
    m, d = cfg.reward.members, cfg.reward.hidden
    eye = torch.eye(d).expand(m, d, d).contiguous()
    reward = ConservativeReward(net, RewardStats(0.0, 1.0, 1.0, 1.0, 1.0), torch.zeros(m, d), eye, eye, penalty)

    def reward_fn(x0: torch.Tensor):
        return reward(backbone.reward_input(x0))

    return FineTuner(policy, reward_fn, alpha=cfg.finetune.alpha, k=k, batch_size=batch, lr=1e-3, steps=10**6)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_time(steps: int, k: int, batch: int, repeats: int) -> dict:
    tuner = build(steps, k, batch)
    policy = tuner.policy
    x = torch.randn(batch, LENGTH, 4)

    def no_grad_call():
        with torch.no_grad():
            policy.means(x, steps)

    def grad_call():
        mean, _, _ = policy.means(x, 1)
        mean.sum().backward()

    t_rows = torch.full((batch,), steps, dtype=torch.long)

    def correction_call():  # an early step's KL: the correction alone, forward and backward
        policy.trainable(x, t_rows).pow(2).sum().backward()

    call = _median_seconds(no_grad_call, repeats * 5)
    call_fb = _median_seconds(grad_call, repeats * 5)
    corr_fb = _median_seconds(correction_call, repeats * 5)
    step = _median_seconds(tuner.train_step, repeats)
    floor = steps * call + k * call_fb + (steps - k) * corr_fb
    return {"T": steps, "K": k, "batch": batch, "policy_call_s": call, "policy_fwd_bwd_s": call_fb,
            "correction_fwd_bwd_s": corr_fb, "floor_s": floor, "step_s": step, "ratio": step / floor}


def backbone_steps(batch: int, repeats: int) -> list[dict]:
    """Part 3: the median seconds of one fine-tuning step of each sequence preset, same batch, same process."""
    rows = []
    for preset in PRESETS:
        tuner = build(None, None, batch, preset=preset)
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
        rows.append({"preset": preset, "backbone": cfg.diffusion.backbone, "length": PRESETS[preset],
                     "T": cfg.diffusion.steps, "K": cfg.finetune.k, "batch": batch,
                     "step_s": _median_seconds(tuner.train_step, repeats)})
        print(f"{preset}: {rows[-1]['step_s']:.2f} s per step", flush=True)
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_memory(steps: int, k: int, batch: int) -> dict:
    """Run in a fresh process (see main): peak RSS growth over the RSS after building, over 3 steps."""
    tuner = build(steps, k, batch)
    before = _rss_bytes()
    for _ in range(3):
        tuner.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"T": steps, "K": k, "batch": batch, "rss_after_build_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
            "growth_mb": (peak - before) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="samples per step (the per-worker default)")
    ap.add_argument("--memory-batch", type=int, default=1024, help="batch of the memory part (activations dominate)")
    ap.add_argument("--k", type=int, default=None, help="differentiable steps (default: the config's finetune.k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbones", action="store_true", help="part 3 only: the four sequence presets' step times")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k = args.k or load_config(ROOT / "configs" / "tfbind8.yaml").finetune.k
    if args.memory_child is not None:
        print(json.dumps(peak_memory(args.memory_child, k, args.memory_batch)))
        return
    if args.backbones:
        rows = backbone_steps(args.batch, args.repeats)
        out = ROOT / "benchmarks" / "results" / "backbone_step.json"
        out.write_text(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch "
                                              f"{torch.__version__}", "command": "python " + " ".join(sys.argv),
                                   "rows": rows}, indent=2))
        print("\n| preset | backbone | length | T | K | batch | step (s) |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['preset']} | {r['backbone']} | {r['length']} | {r['T']} | {r['K']} | {r['batch']} | "
                  f"{r['step_s']:.2f} |")
        return

    timing = [step_time(t, k, args.batch, args.repeats) for t in (50, 100)]
    memory = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for t, kk in ((50, k), (100, k), (50, 2 * k)):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(t), "--k", str(kk), "--memory-batch",
                              str(args.memory_batch), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True, env=env)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
    growth = memory[1]["growth_mb"] / memory[0]["growth_mb"]
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
              "command": "python " + " ".join(sys.argv), "timing": timing, "memory": memory,
              "memory_growth_ratio_T100_vs_T50": growth,
              "memory_growth_ratio_2K_vs_K": memory[2]["growth_mb"] / memory[0]["growth_mb"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| T | K | batch | policy call (ms) | fwd+bwd (ms) | correction fwd+bwd (ms) | floor (ms) | step (ms) | "
          "step / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in timing:
        print(f"| {r['T']} | {r['K']} | {r['batch']} | {1e3 * r['policy_call_s']:.2f} | "
              f"{1e3 * r['policy_fwd_bwd_s']:.2f} | {1e3 * r['correction_fwd_bwd_s']:.2f} | {1e3 * r['floor_s']:.0f} | "
              f"{1e3 * r['step_s']:.0f} | {r['ratio']:.2f} |")
    print()
    print("| T | K | batch | RSS after build (MB) | peak RSS (MB) | growth (MB) |")
    print("|---|---|---|---|---|---|")
    for r in memory:
        print(f"| {r['T']} | {r['K']} | {r['batch']} | {r['rss_after_build_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['growth_mb']:.0f} |")
    print(f"\npeak-memory growth, T=100 / T=50 at K={k}: {growth:.3f} (target within 10%); "
          f"control, K={2 * k} / K={k} at T=50: {result['memory_growth_ratio_2K_vs_K']:.3f}")


if __name__ == "__main__":
    main()

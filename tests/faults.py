"""Deterministic faults for the fault-tolerance tests, installed in Ray workers by patching FineTuner.train_step
(or, for pretraining, the pass-end checkpoint of ``braid_ray.distributed.train``'s ``pretrain``).

Nothing in braid_ray knows about them. Every step a patched worker starts is appended to
``<directory>/steps_rank<r>.log``, so a test can tell a resume from the last checkpoint (1 2 3 | 3 4) from a
restart from scratch (1 2 3 | 1 2 3 4). ``kill`` waits until the checkpoint before it is committed, then
SIGKILLs the worker. ``kill`` and ``hang`` fire once (a marker file is created first, so
the restarted worker group or the re-submitted job runs clean); ``nan`` fires every time, as a real
divergence would.

In a submitted job they are installed by Ray's ``worker_process_setup_hook`` (``tests.faults.from_env``),
configured by BRAID_FAULT=<kind>:<step>:<rank> and BRAID_FAULT_DIR.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def committed_step(run: str | Path, key: str = "step") -> int:
    """The step (or pass, ``key="epoch"``) of the latest checkpoint Ray Train has committed for the run in ``run``
    (its storage folder).

    A report only counts once the controller has collected it from every worker; a worker killed in between
    loses it, so a deterministic fault waits for the commit before it fires.
    """
    try:
        latest = json.loads((Path(run) / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError):  # none yet, or being written
        return 0
    return int(latest["metrics"][key]) if latest else 0


def wait_for_commit(run: str | Path, step: int, timeout: float = 120.0, key: str = "step") -> None:
    deadline = time.monotonic() + timeout
    while committed_step(run, key) < step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint of step {step} committed in {run} after {timeout:.0f} s")
        time.sleep(0.1)


def _kill(tuner) -> None:
    import ray.train

    wait_for_commit(ray.train.get_context().get_storage().experiment_fs_path, tuner.step)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would: no cleanup, no exception


def _hang(tuner) -> None:
    time.sleep(600)  # the test kills the job's driver meanwhile


def _nan(tuner) -> None:
    reward_fn = tuner.reward_fn

    def poisoned(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r_hat, g_hat = reward_fn(x0)
        return r_hat * float("nan"), g_hat

    tuner.reward_fn = poisoned  # this step's loss, and so its gradient, is NaN


FAULTS = {"kill": (_kill, True), "hang": (_hang, True), "nan": (_nan, False)}  # kind -> (action, once)


def _first_time(directory: Path, kind: str) -> bool:
    try:
        (directory / f"{kind}.fired").touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


def install(directory: str, kind: str, step: int, rank: int = 0) -> None:
    """Patch FineTuner.train_step in this process: log every step, and do ``kind`` at ``step`` on ``rank``."""
    from braid_ray.finetune.trainer import FineTuner

    if getattr(FineTuner.train_step, "_fault", None):
        return
    folder = Path(directory)
    action, once = FAULTS[kind]
    original = FineTuner.train_step

    def train_step(self):
        me = dist.get_rank() if dist.is_initialized() else 0
        with open(folder / f"steps_rank{me}.log", "a") as f:
            f.write(f"{self.step + 1}\n")
        if self.step + 1 == step and me == rank and (not once or _first_time(folder, kind)):
            action(self)
        return original(self)

    train_step._fault = True
    FineTuner.train_step = train_step


def install_pretrain_kill(directory: str, after_pass: int, rank: int) -> None:
    """Patch the Ray pretraining worker's ``pretrain`` in this process: log every pass each rank finishes, and
    SIGKILL ``rank`` once the checkpoint of ``after_pass`` is committed (once: the restarted group runs clean)."""
    import ray.train

    from braid_ray.distributed import train

    if getattr(train.pretrain, "_fault", None):
        return
    folder = Path(directory)
    original = train.pretrain

    def pretrain(*args, save, **kwargs):
        def logged(state: dict) -> None:
            me, done = (dist.get_rank() if dist.is_initialized() else 0), len(state["losses"])
            save(state)
            with open(folder / f"passes_rank{me}.log", "a") as f:
                f.write(f"{done}\n")
            if done == after_pass and me == rank and _first_time(folder, "kill"):
                wait_for_commit(ray.train.get_context().get_storage().experiment_fs_path, done, key="epoch")
                os.kill(os.getpid(), signal.SIGKILL)

        return original(*args, save=logged, **kwargs)

    pretrain._fault = True
    train.pretrain = pretrain


def passes_finished(directory: str | Path, rank: int = 0) -> list[int]:
    return _logged(Path(directory) / f"passes_rank{rank}.log")


def from_env() -> None:
    """The worker_process_setup_hook of a submitted job: install the fault BRAID_FAULT names, if any."""
    spec = os.environ.get("BRAID_FAULT")
    if spec:
        kind, step, rank = spec.split(":")
        install(os.environ["BRAID_FAULT_DIR"], kind, int(step), int(rank))


def steps_started(directory: str | Path, rank: int = 0) -> list[int]:
    return _logged(Path(directory) / f"steps_rank{rank}.log")


def _logged(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.is_file() else []

"""`ray job submit -- python launch/finetune.py`, for real: a head started with `ray start --head` on loopback,
jobs submitted through the Ray Jobs API (JobSubmissionClient, what the CLI calls) with cluster/runtime_env.yaml.

The head runs in its own temp dir with its own ports and is stopped by its own processes, never `ray stop`
(which ends every Ray on the machine). It does not use the in-process `ray_local` fixture: the client talks
to the head over HTTP, so the tests work whether or not another Ray runs in this process.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import ray
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from tests import faults
from tests.conftest import ROOT
from tests.tiny import FAST

# FAST's tiny task and models, Ray Train (one worker per trainer) for every stage, and a checkpoint half-way through
# fine-tuning. Each test fine-tunes its own method in the same run directory, so the second reuses the rest.
JOB = (*FAST, "ray.num_workers=1", "finetune.steps=4", "finetune.checkpoint_every=2")
TIMEOUT_S = 900


@dataclass
class Head:
    client: JobSubmissionClient
    temp_dir: str


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(temp_dir: str) -> None:
    """End this head's processes, found by their temp dir, and everything they started (workers, job drivers)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                roots.append(proc)
        except psutil.Error:
            continue
    tree = {p.pid: p for p in roots}
    for proc in roots:
        try:
            tree.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    for proc in tree.values():
        try:
            proc.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(list(tree.values()), timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue


pytestmark = pytest.mark.slow  # a `ray start --head` cluster and Jobs API submissions


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    if importlib.util.find_spec("aiohttp") is None:
        pytest.fail(f"the Ray Jobs API needs the dashboard, which needs ray[default]: "
                    f"pip install 'ray[default]=={ray.__version__}'")
    # A short path: Ray's unix sockets live under it, and AF_UNIX paths stop at ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    gcs, dashboard, agent = _free_ports(3)
    env = dict(os.environ, RAY_AUTH_MODE="disabled",  # loopback only; the client would need the token otherwise
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `python` = this venv
    env.pop("RAY_ADDRESS", None)
    try:
        started = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
             f"--port={gcs}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield Head(JobSubmissionClient(f"http://127.0.0.1:{dashboard}"), temp_dir)
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _runtime_env(**env_vars: str) -> dict:
    """cluster/runtime_env.yaml as `ray job submit --runtime-env` sends it from the repository root."""
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(ROOT)
    runtime_env["env_vars"] |= env_vars
    return runtime_env


def _submit(head: Head, run: Path, *overrides: str, runtime_env: dict | None = None) -> str:
    entrypoint = shlex.join(["python", "launch/finetune.py", *JOB, f"run.dir={run}", *overrides])
    return head.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or _runtime_env())


def _wait(head: Head, job: str) -> JobStatus:
    deadline = time.monotonic() + TIMEOUT_S
    while (status := head.client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job} still {status} after {TIMEOUT_S} s"
        time.sleep(1)
    return status


def _succeeded(head: Head, job: str) -> str:
    status, logs = _wait(head, job), head.client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    return logs


@pytest.fixture(scope="module")
def first_run(head: Head, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("job") / "run"
    return run, _succeeded(head, _submit(head, run, "finetune.methods=[braid_bonus]"))


def test_submitted_job_runs_the_pipeline_on_the_cluster(first_run: tuple[Path, str]) -> None:
    run, logs = first_run
    assert "ray: joined" in logs  # ray.init() found the job's cluster, it did not start a Ray of its own
    for name in ("report.md", "samples.parquet", "metrics.json", "designs.fasta"):
        assert (run / "eval" / name).is_file(), name
    assert "| BRAID-Bonus | 32 |" in (run / "eval" / "report.md").read_text()
    # Every stage trained on Ray Train, with its checkpoints under the run directory.
    for stage, name in (("reward", "reward-seed0"), ("pretrain", "pretrain-seed0"),
                        ("finetune/braid_bonus", "braid_bonus-seed0")):
        assert any((run / stage / "ray" / name).glob("checkpoint_*")), stage
    assert pd.read_parquet(run / "finetune" / "braid_bonus" / "history.parquet")["step"].tolist() == [1, 2, 3, 4]


def _driver(run: Path) -> psutil.Process:
    """The job's driver: the `python launch/finetune.py ... run.dir=<run>` process."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "launch/finetune.py" in cmd and f"run.dir={run}" in cmd:
            return proc
    raise AssertionError(f"no driver process for {run}")


def test_resubmitted_job_resumes_after_its_driver_died(head: Head, first_run: tuple[Path, str],
                                                       tmp_path: Path) -> None:
    run, _ = first_run
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    # Every Train worker of these jobs logs its steps; the first to reach step 3 hangs there (once).
    runtime_env = _runtime_env(BRAID_FAULT="hang:3:0", BRAID_FAULT_DIR=str(fault_dir)) | {
        "worker_process_setup_hook": "tests.faults.from_env"}
    first = _submit(head, run, "finetune.methods=[strl]", runtime_env=runtime_env)
    faults.wait_for_commit(run / "finetune" / "strl" / "ray" / "strl-seed0", step=2, timeout=TIMEOUT_S)
    while not (fault_dir / "hang.fired").exists():
        time.sleep(0.2)
    _driver(run).send_signal(signal.SIGKILL)  # as a lost head process or an OOM kill would
    assert _wait(head, first) == JobStatus.FAILED

    # Its evaluation replaces the first job's (another method list: a conflict unless run.overwrite=true, which
    # rebuilds only the stages whose record changed; the interrupted fine-tuning keeps its checkpoint).
    logs = _succeeded(head, _submit(head, run, "finetune.methods=[strl]", "run.overwrite=true",
                                    runtime_env=runtime_env))
    for stage in ("data", "reward", "pretrain"):
        assert f"{stage}: reusing" in logs
    # The re-submitted job picked the run up at the checkpoint of step 2: step 3 ran twice, steps 1-2 once.
    assert faults.steps_started(fault_dir) == [1, 2, 3, 3, 4]
    assert pd.read_parquet(run / "finetune" / "strl" / "history.parquet")["step"].tolist() == [1, 2, 3, 4]
    assert "| STRL | 32 |" in (run / "eval" / "report.md").read_text()

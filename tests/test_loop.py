"""The one fine-tuning driver and its sinks: every step reaches every sink, checkpoints on their steps,
a non-finite step stops, and TensorBoard gets the scalars when asked."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from braid_ray import pipeline
from braid_ray.config import load_config
from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.sampler import FineTunedPolicy
from braid_ray.finetune.loop import NonFiniteStop, ProgressSink, drive
from braid_ray.finetune.trainer import FineTuner
from tests.tiny import FAST


class Recorder:
    def __init__(self):
        self.steps: list[int] = []
        self.saved: list[int] = []
        self.closed = False

    def report(self, metrics, save) -> None:
        self.steps.append(int(metrics["step"]))
        if save is not None:
            save(Path("unused"))

    def close(self) -> None:
        self.closed = True


def _tuner(steps: int = 5, reward=None) -> FineTuner:
    torch.manual_seed(0)
    policy = FineTunedPolicy(GaussianOneHotDiffusion(4, steps=6), ConvDenoiser(4, 8, 1, 3, 8), "shift")
    reward = reward or (lambda x: (x[..., 0].sum(1), torch.zeros(len(x))))
    return FineTuner(policy, reward, alpha=1e-2, k=2, batch_size=4, lr=1e-2, steps=steps)


def test_every_step_reaches_every_sink_and_checkpoints_fall_on_their_steps() -> None:
    tuner, sink = _tuner(), Recorder()
    saved: list[int] = []
    history = drive(tuner, 5, sinks=[sink], save=lambda d: saved.append(tuner.step), checkpoint_every=2)
    assert sink.steps == [1, 2, 3, 4, 5] and saved == [2, 4, 5] and sink.closed
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    for key in ("objective", "kl", "step_seconds", "samples_per_second", "peak_memory_mb"):
        assert all(h[key] == h[key] for h in history), key  # present and not NaN
    assert history[0]["samples_per_second"] > 0 and history[0]["peak_memory_mb"] > 0


def test_resuming_the_driver_continues_the_history() -> None:
    tuner = _tuner()
    history = drive(tuner, 2, sinks=[])
    drive(tuner, 5, sinks=[], history=history)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]


def test_a_nonfinite_step_stops_before_the_optimizer_moves() -> None:
    tuner = _tuner(reward=lambda x: (x[..., 0].sum(1) * float("nan"), torch.zeros(len(x))))
    before = [p.detach().clone() for p in tuner.params]
    with pytest.raises(NonFiniteStop, match="fine-tuning step 1: non-finite"):
        drive(tuner, 3, sinks=[Recorder()])
    assert tuner.step == 0 and all(torch.equal(a, b) for a, b in zip(before, tuner.params))


def test_progress_sink_prints_lines_or_a_bar(caplog, capsys) -> None:
    metrics = {"step": 2.0, "r_hat": 1.0, "g_hat": 0.5, "kl": 0.1, "objective": 0.4, "step_seconds": 0.2}
    with caplog.at_level("INFO", logger="braid_ray"):
        ProgressSink("fine-tune strl", 4, every=2, bar=False).report(metrics, None)
        ProgressSink("fine-tune strl", 4, every=2, bar=False).report(metrics | {"step": 3.0}, None)
    assert [r.getMessage() for r in caplog.records] == [
        "fine-tune strl step 2/4: r_hat 1.0000 g_hat 0.5000 KL 0.1000 objective 0.4000 (0.20 s/step)"]
    ProgressSink("fine-tune strl", 4, every=2, bar=True).report(metrics, None)
    assert "\r[###############...............] fine-tune strl step 2/4" in capsys.readouterr().err


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (TFRecord framing: length, crc, event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_logs_appear_for_a_run_when_asked(tmp_path: Path) -> None:
    cfg = load_config(None, [*FAST, f"run.dir={tmp_path}", "finetune.methods=[strl]", "finetune.steps=3",
                             "tracking.tensorboard=true"])
    pipeline.run(cfg, stages=("data", "reward", "pretrain", "finetune"))
    scalars = read_scalars(tmp_path / "tensorboard" / "finetune" / "strl")
    assert [step for step, _ in scalars["train/objective"]] == [1, 2, 3]
    assert {"train/kl", "train/r_hat", "train/step_seconds", "train/peak_memory_mb"} <= set(scalars)


def test_mlflow_sink_logs_every_step_to_the_given_tracking_uri(monkeypatch) -> None:
    """mlflow is an optional extra: a stand-in module records what the sink sends."""
    import sys
    import types

    calls: list[tuple] = []
    fake = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)),
        set_experiment=lambda name: calls.append(("experiment", name)),
        start_run=lambda run_name: calls.append(("start", run_name)),
        log_metrics=lambda metrics, step: calls.append(("log", step, sorted(metrics))),
        end_run=lambda: calls.append(("end",)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    from braid_ray.config import TrackingConfig
    from braid_ray.finetune.loop import MLflowSink, tracking_sinks

    sinks = tracking_sinks(TrackingConfig(mlflow_uri="file:///tmp/mlruns", progress="lines"), None, "fine-tune strl",
                           "finetune/strl", 2, 1)
    assert [type(s) for s in sinks] == [ProgressSink, MLflowSink]
    assert tracking_sinks(TrackingConfig(mlflow_uri="x"), None, "w", "s", 2, 1, rank=1) == []  # rank 0 only
    drive(_tuner(steps=2), 2, sinks=sinks)
    assert calls[:3] == [("uri", "file:///tmp/mlruns"), ("experiment", "braid-ray"), ("start", "finetune/strl")]
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2] and "objective" in logged[0][2] and "step" not in logged[0][2]
    assert calls[-1] == ("end",)


def test_the_plateau_rule_stops_when_the_objective_stops_improving() -> None:
    from braid_ray.finetune.loop import plateaued

    rising = [{"objective": 0.1 * i} for i in range(20)]
    flat = rising + [{"objective": 2.0}] * 10
    assert not plateaued(rising, 5, 0.01) and plateaued(flat, 5, 0.01)
    assert not plateaued(flat, 0, 0.01)  # off
    assert not plateaued(flat[:9], 5, 0.01)  # too short to judge


def test_a_plateaued_run_stops_early_and_a_resumed_one_does_not_train_again() -> None:
    tuner = _tuner(steps=200, reward=lambda x: (torch.zeros(len(x)), torch.zeros(len(x))))
    sink, saved = Recorder(), []
    history = drive(tuner, 200, sinks=[sink], save=lambda d: saved.append(tuner.step), checkpoint_every=50,
                    plateau=(3, 0.01))
    assert 6 <= len(history) < 200 and saved[-1] == len(history)  # the stop step is checkpointed
    drive(tuner, 200, sinks=[], history=history, plateau=(3, 0.01))
    assert tuner.step == len(history)


def test_the_run_summary_puts_alpha_kl_beside_the_reward_gain() -> None:
    from braid_ray.finetune.loop import run_summary

    history = [{"objective": 0.0, "kl": 0.0, "kl_early": 0.0},
               {"objective": 0.9, "kl": 100.0, "kl_early": 60.0}]
    out = run_summary(history, alpha=1e-3, plateau=(1, 0.0))
    assert out["reward_gain_z"] == pytest.approx(1.0) and out["alpha_kl_z"] == pytest.approx(0.1)
    assert out["alpha_kl_share"] == pytest.approx(0.1) and out["kl_early"] == 60.0 and out["steps_run"] == 2

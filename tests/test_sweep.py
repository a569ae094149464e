"""Sweeps on Ray Tune: the sweep file's checks, selection over seeds, a 2x2 grid, and a killed sweep resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from braid_ray import pipeline
from braid_ray.config import ConfigError, load_config
from braid_ray.sweep import load_sweep, trial_config
from braid_ray.sweep.results import (best_config_yaml, best_params, score_map, seed_markdown, seed_table,
                                     trials_frame)
from tests.conftest import ROOT
from tests.tiny import FAST

# The tiny task and models (tests/tiny.py); trials fine-tune in-trial (ray.num_workers=0).
TINY = [*FAST, "finetune.methods=[braid_bonus]", "finetune.steps=4", "finetune.checkpoint_every=2"]


def write_sweep(path: Path, run_dir: Path, search: dict, sweep: dict, overrides: tuple[str, ...] = ()) -> Path:
    tree = {"base": {"config": str(ROOT / "configs" / "tfbind8.yaml"),
                     "overrides": [f"run.dir={run_dir}", *TINY, *overrides]},
            "search": search, "sweep": sweep}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data, oracle, reward and pretrained model, trained once for every sweep in this module."""
    run_dir = tmp_path_factory.mktemp("upstream")
    pipeline.run(load_config(None, [f"run.dir={run_dir}", *TINY]), stages=("data", "oracle", "reward", "pretrain"))
    return run_dir


# --------------------------------------------------------------------------------------------------
# The sweep file


def test_committed_sweep_files_load() -> None:
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        sweep = load_sweep(path)
        assert sweep.search and sweep.method
    tfbind = load_sweep(ROOT / "configs" / "sweeps" / "tfbind8_alpha.yaml")
    assert tfbind.grid_size() == 18 and tfbind.method == "braid_bonus" and tfbind.settings.oracle_budget == 64
    assert tfbind.search["finetune.alpha"] == {"grid": [1e-3, 1e-2, 1e-1]}  # YAML's 1.0e-3 read as a float
    assert Path(tfbind.base.run.dir).is_absolute()  # trials run in their own working directory


BAD = [
    ({"search": {"finetune.alpah": {"grid": [0.1]}}},
     "unknown search key finetune.alpah (did you mean finetune.alpha?)"),
    ({"search": {"reward.members": {"grid": [2, 4]}}}, "only finetune.* keys and run.seed can vary"),
    ({"search": {"finetune.alpha": {"grid": [0.1, -1]}}}, "search finetune.alpha: finetune.alpha: got -1"),
    ({"search": {"finetune.alpha": 0.1}}, "constant values belong in base.overrides"),
    ({"search": {"finetune.alpha": {"uniform": [0.1, 1.0]}}}, "use grid with sweep.search_alg=grid"),
    ({"search": {"finetune.alpha": {"loguniform": [0.0, 1.0]}}, "sweep": {"search_alg": "random"}},
     "expected lo > 0"),
    ({"search": {"finetune.alpha": {"grdi": [0.1]}}},
     "unknown search kind for finetune.alpha: grdi (did you mean grid?)"),
    ({"sweep": {"oracle_budjet": 8}}, "unknown key sweep.oracle_budjet (did you mean sweep.oracle_budget?)"),
    ({"sweep": {"oracle_budget": 0}}, "sweep.oracle_budget: got 0"),
    ({"sweep": {"search_alg": "bayes"}}, "sweep.search_alg: got 'bayes'"),
    ({"serch": {}}, "unknown top-level key serch (did you mean search?)"),
    ({"overrides": ["finetune.methods=[strl,braid_bonus]"]}, "a sweep trial fine-tunes one method"),
    ({"search": {"finetune.monitor_queries": {"grid": [0, 16]}}}, "finetune.monitor_queries: got 16; a sweep"),
    ({"sweep": {"gpus_per_trial": -0.5}}, "sweep.gpus_per_trial: got -0.5"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_sweep_files_stop_before_any_work(tmp_path: Path, change: dict, message: str) -> None:
    tree = {"search": change.get("search", {"finetune.alpha": {"grid": [0.1]}}),
            "sweep": {"name": "bad", "storage": str(tmp_path / "out"), **change.get("sweep", {})}}
    path = write_sweep(tmp_path / "bad.yaml", tmp_path / "run", tree["search"], tree["sweep"],
                       tuple(change.get("overrides", ())))
    if "serch" in change:
        path.write_text(path.read_text() + "serch: {}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_optuna_without_the_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # find_spec("optuna") -> None, as if not installed
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "run", {"finetune.alpha": {"choice": [0.1, 1.0]}},
                       {"search_alg": "optuna"})
    with pytest.raises(ConfigError, match=r"needs the optuna package.*pip install 'braid-ray\[optuna\]'"):
        load_sweep(path)


def test_command_line_overrides_reach_the_settings_and_the_base_config(tmp_path: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "run", {"run.seed": {"grid": [0, 1, 2]}}, {"name": "x"})
    sweep = load_sweep(path, ["sweep.oracle_budget=8", "sweep.asha.enabled=true", "sweep.asha.grace_period=2",
                              "finetune.steps=3"])
    assert sweep.settings.oracle_budget == 8 and sweep.settings.asha.enabled and sweep.base.finetune.steps == 3
    assert sweep.grid_size() == 3
    with pytest.raises(ConfigError, match="grace_period: got 4, expected at most finetune.steps=3"):
        load_sweep(path, ["sweep.asha.enabled=true", "sweep.asha.grace_period=4", "finetune.steps=3"])


def test_a_changed_sweep_file_does_not_resume_the_old_sweep(tmp_path: Path) -> None:
    from braid_ray.distributed.tune import check_record, sweep_uri

    path = write_sweep(tmp_path / "s.yaml", tmp_path / "run", {"finetune.alpha": {"grid": [0.1, 1.0]}},
                       {"name": "r", "storage": str(tmp_path / "out")})
    sweep = load_sweep(path)
    uri = sweep_uri(sweep)
    check_record(sweep, uri)  # the first start records the sweep
    check_record(load_sweep(path, ["sweep.max_concurrent_trials=1"]), uri)  # resources may change on resume
    with pytest.raises(ConfigError, match=r"started with a different sweep file \(base.finetune.steps: 4 -> 5\)"):
        check_record(load_sweep(path, ["finetune.steps=5"]), uri)


def test_asha_stops_on_the_conservative_objective_never_on_the_oracle(tmp_path: Path) -> None:
    from braid_ray.distributed.tune import search_parts

    path = write_sweep(tmp_path / "s.yaml", tmp_path / "run", {"finetune.alpha": {"grid": [0.1, 1.0]}},
                       {"asha": {"enabled": True, "grace_period": 2}})
    search, scheduler = search_parts(load_sweep(path), max_concurrent=2)
    assert type(scheduler).__name__ == "AsyncHyperBandScheduler"
    assert scheduler.metric == "objective" and scheduler._time_attr == "step" and scheduler._max_t == 4


# --------------------------------------------------------------------------------------------------
# Selection (pure: no Ray)


def test_selection_uses_the_mean_over_seeds_not_one_lucky_seed(tmp_path: Path) -> None:
    keys = ["finetune.alpha", "run.seed"]
    rows = [{"finetune.alpha": 0.1, "run.seed": 0, "oracle_score": 0.95, "oracle_queries": 8},
            {"finetune.alpha": 0.1, "run.seed": 1, "oracle_score": 0.15, "oracle_queries": 8},
            {"finetune.alpha": 1.0, "run.seed": 0, "oracle_score": 0.60, "oracle_queries": 8},
            {"finetune.alpha": 1.0, "run.seed": 1, "oracle_score": 0.70, "oracle_queries": 8},
            {"finetune.alpha": 3.0, "run.seed": 0, "oracle_score": None, "oracle_queries": 0},  # stopped early
            {"finetune.alpha": 3.0, "run.seed": 1, "error": "RuntimeError: boom"}]
    for row in rows:
        row.update({"objective": 1.0, "r_hat": 0.5, "g_hat": 0.1, "kl": 0.01})
    trials = trials_frame(rows, keys)
    assert trials["status"].tolist() == ["finished"] * 4 + ["stopped", "error"]
    assert trials["oracle_queries"].sum() == 32
    table = seed_table(trials, keys)
    assert table["finetune.alpha"].tolist() == [1.0, 0.1] and table["seeds"].tolist() == [2, 2]
    assert table["oracle_score_mean"].tolist() == pytest.approx([0.65, 0.55])
    assert table["oracle_score_std"].iloc[0] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert best_params(table, keys) == {"finetune.alpha": 1.0}
    assert "| 1 | 2 | 0.65 ± 0.071 |" in seed_markdown(table, keys)

    search = {"finetune.alpha": {"grid": [0.1, 1, 3]}, "run.seed": {"grid": [0, 1]}}
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "run", search, {"name": "sel"}, ("run.seed=7",)))
    text = best_config_yaml(sweep, {"finetune.alpha": 1.0}, table, 32)
    (tmp_path / "best.yaml").write_text(text)
    best = load_config(tmp_path / "best.yaml")
    assert best.finetune.alpha == 1.0 and best.run.seed == 7  # the base seed: the upstream models' seed
    assert text.startswith("# Best configuration of sweep sel") and "32 in the whole sweep" in text

    # The picture: a heatmap over listed values, a scatter over drawn ones; none without both keys.
    search = {"finetune.alpha": {"loguniform": [0.01, 10.0]}, "finetune.strength": {"uniform": [0.0, 2.0]}}
    drawn = trials.assign(**{"finetune.strength": [0.5, 0.7, 1.1, 1.3, 0.2, 0.4]})
    png = score_map(drawn, search, {"finetune.alpha": 1.0, "finetune.strength": 1.1}, None, "t")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert score_map(trials, {"finetune.alpha": {"grid": [0.1, 1.0]}}, {"finetune.alpha": 1.0}, None, "t") is None


# --------------------------------------------------------------------------------------------------
# One trial, in this process


class ListReporter:
    """A TrialReporter that keeps the reports and the last checkpoint's files."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.reports: list[dict] = []
        self.files = files

    def checkpoint_files(self) -> dict[str, bytes] | None:
        return self.files

    def report(self, metrics: dict, files: dict[str, bytes] | None = None) -> None:
        self.reports.append(metrics)
        self.files = files if files is not None else self.files


def test_a_trial_queries_the_oracle_exactly_its_budget_and_never_twice(upstream: Path, monkeypatch) -> None:
    from braid_ray.sweep import trial

    queries: list[int] = []
    load = trial.load_upstream

    def counted(base):
        data, oracle = load(base)
        score = oracle.score
        monkeypatch.setattr(oracle, "score", lambda codes: queries.append(len(codes)) or score(codes))
        return data, oracle

    base = load_config(None, [f"run.dir={upstream}", *TINY])
    reference = trial.sweep_reference(base)  # the driver's, once per sweep: |D_off| queries of its own
    assert reference["seed"] == base.run.seed  # every trial's ELBOs on the noise the rule's limit was set with
    monkeypatch.setattr(trial, "load_upstream", counted)
    cfg = trial_config(base.to_dict(), {"finetune.alpha": 0.01, "run.seed": 3})
    reporter = ListReporter()
    final = trial.run_trial(cfg, base, 12, reference, reporter)
    assert queries == [12] and final["oracle_queries"] == 12 and np.isfinite(final["oracle_score"])
    assert 0 <= final["valid_share"] <= 1 and np.isfinite(final["oracle_mean"])
    assert [r["step"] for r in reporter.reports] == [1, 2, 3, 4] and reporter.reports[-1] == final
    assert all(r["oracle_queries"] == 0 and np.isnan(r["oracle_score"]) for r in reporter.reports[:-1])
    assert {"trainable.safetensors", "trainer_state.pt", "final.json"} <= set(reporter.files)

    # Resumed after it finished: the same result, no training, no oracle query.
    again = ListReporter(reporter.files)
    assert trial.run_trial(cfg, base, 12, reference, again) == final and again.reports == [final] and queries == [12]

    # Under a rule that calls every design hacked (any run of one letter), the trial scores the worst offline
    # design, whatever the oracle says: the sweep's score is the evaluation's selection score.
    strict = {**reference, "rule": {**reference["rule"], "homopolymer_run": 1}}
    other = trial.run_trial(trial_config(base.to_dict(), {"finetune.alpha": 0.01, "run.seed": 4}), base, 12, strict,
                            ListReporter())
    assert other["valid_share"] == 0 and other["oracle_score"] == strict["worst_offline"]
    assert other["oracle_mean"] != other["oracle_score"]


# --------------------------------------------------------------------------------------------------
# On a local Ray


@pytest.mark.slow  # a Tune grid on the local Ray
def test_grid_sweep_on_local_ray(tmp_path: Path, upstream: Path, ray_local) -> None:
    budget = 16
    path = write_sweep(tmp_path / "grid.yaml", upstream,
                       {"finetune.alpha": {"grid": [1e-3, 0.1]}, "finetune.strength": {"grid": [0.5, 2.0]}},
                       {"name": "grid", "storage": str(tmp_path / "sweeps"), "oracle_budget": budget})
    outcome = pipeline.sweep(load_sweep(path))

    results = tmp_path / "sweeps" / "grid" / "results"
    trials = pd.read_parquet(results / "trials.parquet")
    pd.testing.assert_frame_equal(trials, outcome.trials)
    csv = pd.read_csv(results / "trials.csv")
    assert csv["oracle_score"].tolist() == pytest.approx(trials["oracle_score"].tolist())
    assert len(trials) == 4 and (trials["status"] == "finished").all()
    assert sorted(zip(trials["finetune.alpha"], trials["finetune.strength"])) == [
        (1e-3, 0.5), (1e-3, 2.0), (0.1, 0.5), (0.1, 2.0)]
    for col in ("r_hat", "g_hat", "kl", "oracle_score", "objective"):
        assert np.isfinite(trials[col]).all(), col
    assert (trials["step"] == 4).all() and (trials["oracle_queries"] == budget).all()
    assert ((trials["oracle_score"] >= 0) & (trials["oracle_score"] <= 1)).all()  # means of normalised E-scores
    # g_hat = strength * (the same bonus): it scales with the penalty strength.
    g = trials.groupby("finetune.strength")["g_hat"].mean()
    assert g[2.0] == pytest.approx(4 * g[0.5], rel=0.2)
    assert outcome.summary["oracle_queries_trials"] == 4 * budget and outcome.summary["trials"] == {"finished": 4}

    # The conservative objective was reported after every step (what ASHA acts on), the oracle only at the end.
    progress = pd.read_csv(tmp_path / "sweeps" / "grid" / "tune" / trials["trial_id"].iloc[0] / "progress.csv")
    assert progress["step"].tolist() == [1, 2, 3, 4]
    assert progress["oracle_queries"].tolist() == [0, 0, 0, budget]

    seeds = pd.read_csv(results / "seeds.csv")
    assert len(seeds) == 4 and (seeds["seeds"] == 1).all()
    best_row = trials.loc[trials["oracle_score"].idxmax()]
    assert seeds["oracle_score_mean"].iloc[0] == pytest.approx(best_row["oracle_score"])
    best = load_config(results / "best.yaml")  # a full config that launch/finetune.py --config accepts
    assert (best.finetune.alpha, best.finetune.strength) == (outcome.best["finetune.alpha"],
                                                             outcome.best["finetune.strength"])
    assert trials.loc[(trials["finetune.alpha"] == best.finetune.alpha)
                      & (trials["finetune.strength"] == best.finetune.strength), "oracle_score"].iloc[0] == \
        pytest.approx(trials["oracle_score"].max())
    assert best.finetune.methods == ["braid_bonus"] and best.run.dir == str(upstream)
    assert (results / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["oracle_budget_per_trial"] == budget and summary["pretrained_reference"]["oracle_queries"] == budget


@pytest.mark.slow  # a Ray Train run inside each of two Tune trials
def test_train_trials_report_every_step_so_asha_stops_them(tmp_path: Path, upstream: Path, ray_local) -> None:
    from braid_ray.distributed.tune import autoscaler_max_resources

    assert autoscaler_max_resources() is None  # a local Ray publishes no autoscaler config
    budget, steps = 8, 3
    # One trial at a time, so ASHA's decision is known: the first trial sets the rungs (steps 1 and 2); the
    # second has the same samples at step 1 but a 5x penalty, so a lower conservative objective, and stops there.
    path = write_sweep(tmp_path / "train.yaml", upstream, {"finetune.strength": {"grid": [0.0, 5.0]}},
                       {"name": "train", "storage": str(tmp_path / "sweeps"), "oracle_budget": budget,
                        "max_concurrent_trials": 1, "asha": {"enabled": True, "grace_period": 1}},
                       ("ray.num_workers=1", "ray.cpus_per_worker=0.5", f"finetune.steps={steps}"))
    outcome = pipeline.sweep(load_sweep(path))
    first, second = outcome.trials.to_dict("records")
    assert outcome.summary["trials"] == {"finished": 1, "stopped": 1}
    assert first["status"] == "finished" and first["step"] == steps and first["oracle_queries"] == budget
    assert np.isfinite([first["objective"], first["kl"], first["oracle_score"]]).all() and first["device"] == "cpu"
    assert second["status"] == "stopped" and second["oracle_queries"] == 0

    # Every step of the Train run reached the Tune trial, in the rows in-process trials report; the last step's
    # row is the final report, with the oracle budget, once.
    tune_dir = tmp_path / "sweeps" / "train" / "tune"
    done = pd.read_csv(tune_dir / first["trial_id"] / "progress.csv")
    assert done["step"].tolist() == [1, 2, 3] and done["oracle_queries"].tolist() == [0, 0, budget]
    assert done["objective"].notna().all() and done["oracle_score"].isna().tolist() == [True, True, False]
    stopped = pd.read_csv(tune_dir / second["trial_id"] / "progress.csv")
    assert stopped["step"].tolist() == [1] and (stopped["oracle_queries"] == 0).all()
    assert stopped["objective"].iloc[0] < done["objective"].iloc[0]
    # The fine-tuning ran as a Ray Train run named after the trial, with its checkpoints in the sweep's folder.
    checkpoints = list((tmp_path / "sweeps" / "train" / "train" / first["trial_id"]).glob("checkpoint_*"))
    assert any((c / "trainable.safetensors").is_file() for c in checkpoints)


def _reports(tune_dir: Path) -> dict[str, list[dict]]:
    """Every trial's reports so far (its result.json lines), by trial directory."""
    out = {}
    for result in tune_dir.glob("*/result.json"):
        lines = []
        for line in result.read_bytes().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        out[result.parent.name] = lines
    return out


def _finished(reports: list[dict]) -> bool:
    return any(r.get("oracle_queries", 0) > 0 for r in reports)


@pytest.mark.slow  # a sweep driver in a subprocess, killed and started again
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path: Path, upstream: Path, ray_local) -> None:
    steps = 60
    path = write_sweep(tmp_path / "resume.yaml", upstream,
                       {"finetune.alpha": {"grid": [1e-3, 0.1]}, "finetune.strength": {"grid": [0.5, 2.0]}},
                       {"name": "resume", "storage": str(tmp_path / "sweeps"), "oracle_budget": 8,
                        "max_concurrent_trials": 1},
                       (f"finetune.steps={steps}", "finetune.checkpoint_every=10"))
    command = [sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", str(path)]
    # The driver joins the test's Ray, so killing it ends its trials but not the cluster.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    tune_dir = tmp_path / "sweeps" / "resume" / "tune"

    def interrupted(reports: dict[str, list[dict]]) -> bool:
        """Two trials done, and the third (one at a time) past its first checkpoint, far from its end."""
        running = [r for r in reports.values() if r and not _finished(r)]
        return sum(map(_finished, reports.values())) == 2 and any(r[-1]["step"] >= 12 for r in running)

    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not interrupted(_reports(tune_dir)):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep did not reach its third trial in time"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's process group: the process this test started
        driver.wait()
    killed_at = time.time()
    before = _reports(tune_dir)
    finished_at = {t: r[-1]["finished_at"] for t, r in before.items() if _finished(r)}
    (cut,) = [t for t, r in before.items() if r and not _finished(r)]
    assert len(finished_at) == 2 and before[cut][-1]["step"] < steps

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sweep: resuming" in second.stderr

    trials = pd.read_parquet(tmp_path / "sweeps" / "resume" / "results" / "trials.parquet")
    assert len(trials) == 4 and (trials["status"] == "finished").all() and (trials["step"] == steps).all()
    assert (trials["oracle_queries"] == 8).all()
    by_id = trials.set_index("trial_id")
    for trial, when in finished_at.items():  # finished before the kill: same result, not trained or scored again
        assert by_id.loc[trial, "finished_at"] == when and when < killed_at
    rest = [t for t in by_id.index if t not in finished_at]
    assert cut in rest and len(rest) == 2 and (by_id.loc[rest, "finished_at"] > killed_at).all()
    # The interrupted trial went on from its last checkpoint (every 10 steps), not from step 1. (Whether Tune logs
    # the re-run steps between that checkpoint and the last logged step again depends on timing: under load it
    # has continued the log at the next step, so only the range is checked.)
    after = _reports(tune_dir)[cut]
    assert after[:len(before[cut])] == before[cut]
    resumed_at = after[len(before[cut])]["step"] - 1
    assert 10 <= resumed_at <= before[cut][-1]["step"] and after[-1]["step"] == steps

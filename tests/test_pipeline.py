"""The pipeline end to end: stages written, reused, never silently overwritten; and `python launch/finetune.py`,
the script a user runs, with its summary on stdout and one line, exit code 2, for a bad input.

The runs are the tiny tfbind5 task in this process (tests/tiny.py); the real default (TFBind8) runs once, through
the script, marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from braid_ray import cli, pipeline
from braid_ray.evaluate import rescore_selection
from braid_ray.rundir import RunDir, StageConflict
from braid_ray.stages import data_stage, oracle_stage
from tests.conftest import ROOT
from tests.tiny import FAST, MODELS, ROWS, ROWS_LINE, tiny_config


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _reused(caplog: pytest.LogCaptureFixture) -> set[str]:
    """The stages whose reuse was logged: "<stage>: reusing <run dir>/<stage> (...)"."""
    return {r.getMessage().split(": reusing")[0] for r in caplog.records if ": reusing " in r.getMessage()}


def test_tiny_task_end_to_end_and_reuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    printed = pipeline.format_summary(pipeline.run(tiny_config(f"run.dir={run}")))
    assert ROWS_LINE in printed and "oracle      table: exact" in printed
    for name in ("d.parquet", "d_ora.parquet", "d_0.parquet", "d_off.parquet", "summary.json", "stage.json"):
        assert (run / "data" / name).is_file(), name
    off = pd.read_parquet(run / "data" / "d_off.parquet")
    zero = pd.read_parquet(run / "data" / "d_0.parquet")
    assert len(off) == ROWS["D_off"] and off["y"].max() < zero["y"].median() + 1e-12
    assert (run / "config.yaml").is_file() and (run / "oracle" / "info.json").is_file()
    assert (run / "reward" / "reward.safetensors").is_file() and "| bonus |" in printed
    for name in ("report.md", "samples.parquet", "metrics.json", "designs.fasta", "scores.png", "training.png"):
        assert (run / "eval" / name).is_file(), name
    samples = pd.read_parquet(run / "eval" / "samples.parquet")
    assert set(samples["method"]) == {"Offline (top)", "Offline (random)", "Grad. (r_hat)", "Pretrained", "STRL",
                                      "BRAID-Bonus"}
    assert "| BRAID-Bonus | 32 |" in printed

    before = (run / "data" / "d_off.parquet").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="braid_ray"):
        again = pipeline.format_summary(pipeline.run(tiny_config(f"run.dir={run}")))
    assert _reused(caplog) >= {"data", "oracle", "reward", "pretrain", "finetune/strl", "finetune/braid_bonus"}
    assert (run / "data" / "d_off.parquet").stat().st_mtime_ns == before and ROWS_LINE in again


def test_changed_config_never_silently_overwrites(tmp_path: Path) -> None:
    run = tmp_path / "run"
    pipeline.run(tiny_config(f"run.dir={run}"))
    before = (run / "data" / "d_off.parquet").read_bytes()
    with pytest.raises(StageConflict, match=r"data.quantile: 0.5 -> 0.3.*run.overwrite=true"):
        pipeline.run(tiny_config(f"run.dir={run}", "data.quantile=0.3"))
    assert (run / "data" / "d_off.parquet").read_bytes() == before
    pipeline.run(tiny_config(f"run.dir={run}", "data.quantile=0.3", "run.overwrite=true"))
    assert len(pd.read_parquet(run / "data" / "d_off.parquet")) < ROWS["D_off"] * 0.7
    assert json.loads((run / "eval" / "metrics.json").read_text())["methods"]  # every later stage made again


def test_launch_script_prints_the_summary_and_stops_a_changed_stage_with_one_line(tmp_path: Path) -> None:
    """The script itself: exit code 0 and the summary on stdout; then exit code 2 and one line, no traceback."""
    run = tmp_path / "run"
    first = _launch(*FAST, f"run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"rows        {ROWS_LINE}" in first.stdout and "oracle      table: exact" in first.stdout
    assert "| BRAID-Bonus | 32 |" in first.stdout and f"(report: {run}/eval/report.md)" in first.stdout

    changed = _launch(*FAST, f"run.dir={run}", "data.quantile=0.3")
    assert changed.returncode == 2 and changed.stdout == "" and "Traceback" not in changed.stderr
    errors = [line for line in changed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "data.quantile: 0.5 -> 0.3" in errors[0] and "run.overwrite=true" in errors[0]


def _main(*args: str) -> int:
    """launch/finetune.py's main as the script runs it (cli.run_main), in this process; returns the exit code."""
    spec = importlib.util.spec_from_file_location("launch_finetune", ROOT / "launch" / "finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(lambda: script.main(list(args)))
    return exit_.value.code


def test_bad_input_stops_before_any_work_with_one_clear_line(tmp_path: Path, capsys, caplog) -> None:
    run = tmp_path / "run"
    assert _main(*FAST, f"run.dir={run}", "data.quantil=0.5") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("config error: unknown key data.quantil (did you mean data.quantile?)")
    caplog.clear()
    assert _main(*MODELS, f"run.dir={run}", "task.name=csv", f"task.path={tmp_path / 'none.csv'}",
                 "task.sequence_column=seq", "task.label_column=y") == 2
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "table not found" in error.getMessage() and error.exc_info is None
    assert "Traceback" not in capsys.readouterr().err and not (run / "data").exists()


@pytest.mark.slow
def test_default_task_end_to_end(tmp_path: Path) -> None:
    """`python launch/finetune.py` on the embedded default, TFBind8 (65,536 8-mers), with tiny models."""
    run = tmp_path / "run"
    out = _launch(*MODELS, f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "D 65,536 | D_ora 0 | D_0 65,536 | D_off 32,768" in out.stdout
    assert "task        tfbind8:" in out.stdout and "oracle      table: exact" in out.stdout
    off = pd.read_parquet(run / "data" / "d_off.parquet")
    zero = pd.read_parquet(run / "data" / "d_0.parquet")
    assert len(off) == 32_768 and off["y"].max() < zero["y"].median() + 1e-12
    assert "| BRAID-Bonus | 32 |" in out.stdout and (run / "eval" / "report.md").is_file()


def test_user_table_with_a_trained_oracle(tmp_path: Path, enhancer_table: Path) -> None:
    run = tmp_path / "run"
    summary = pipeline.run(tiny_config(f"run.dir={run}", f"task.path={enhancer_table}", "data.quantile=0.8",
                                       "oracle.epochs=2", "oracle.channels=8", "oracle.hidden=16", "oracle.layers=1",
                                       preset=str(ROOT / "configs" / "enhancer_csv.yaml")))
    printed = pipeline.format_summary(summary)
    assert "D 120 | D_ora 60 | D_0 60 | D_off 48" in printed and "held-out Pearson" in printed
    assert (run / "oracle" / "oracle.safetensors").is_file()


def test_stage_conflict_names_the_changed_keys(tmp_path: Path) -> None:
    stage = RunDir(str(tmp_path)).stage("x")
    assert stage.begin({"a": 1, "b": {"c": 2}}, overwrite=False) is False
    stage.write_json("out.json", {"v": 1})
    stage.finish({"a": 1, "b": {"c": 2}})
    assert stage.begin({"a": 1, "b": {"c": 2}}, overwrite=False) is True
    try:
        stage.begin({"a": 1, "b": {"c": 3}}, overwrite=False)
    except StageConflict as e:
        assert "b.c: 2 -> 3" in str(e)
    else:
        raise AssertionError("expected a StageConflict")
    assert stage.read_json("out.json") == {"v": 1}
    # An interrupted stage (pending, not finished) with the same record keeps its leftovers to resume from.
    other = RunDir(str(tmp_path)).stage("y")
    other.begin({"k": 1}, overwrite=False)
    other.write_json("partial.json", {"step": 3})
    assert other.begin({"k": 1}, overwrite=False) is False and other.exists("partial.json")


def test_utr_designs_are_scored_by_an_independent_oracle_too(tmp_path: Path) -> None:
    """utr_mrl's oracle (Optimus 5-Prime) was trained on the same library as D: the evaluation adds a k-mer ridge
    trained on D_ora only, and reports both oracles and their agreement per method."""
    run = tmp_path / "utr"
    cfg = tiny_config(f"run.dir={run}", "task.subset=ci", "finetune.methods=[strl]", "eval.grad_ascent=false",
                      preset=str(ROOT / "configs" / "utr_mrl.yaml"))
    pipeline.run(cfg)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    agreement = metrics["oracle_agreement"]
    assert agreement["secondary"]["kind"] == "kmer_ridge" and metrics["oracles"]["primary"]["kind"] == "optimus5p"
    strl = metrics["methods"]["STRL"]
    assert {"secondary_median", "both_frac_above_best", "oracle_spearman"} <= set(strl)
    assert strl["both_frac_above_best"] <= min(strl["frac_above_best"], strl["secondary_frac_above_best"])
    # the alpha-selection score counts the designs the validity rule calls hacked as the worst offline design
    assert metrics["selection"]["rule"] == "valid" and 0 <= strl["selection_valid_share"] <= 1
    # ... and rescoring the run's selection designs from what metrics.json recorded (benchmarks/quality.py reselect)
    # gives the evaluation's numbers exactly: the same designs, the same rule, the same ELBO noise
    rd = RunDir(str(run))
    data = data_stage(cfg, rd)
    assert rescore_selection(cfg, rd, data, oracle_stage(cfg, rd, data))["STRL"] == {
        k: strl[k] for k in ("selection_score", "selection_score_raw", "selection_valid_share")}
    samples = pd.read_parquet(run / "eval" / "samples.parquet")
    assert samples["oracle_secondary"].notna().all()
    assert "An independent oracle beside the primary: kmer_ridge" in (run / "eval" / "report.md").read_text()

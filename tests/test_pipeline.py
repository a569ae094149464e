"""`python launch/finetune.py` end to end: stages written, reused, never silently overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from braid_ray.rundir import RunDir, StageConflict
from tests.conftest import ROOT


# A small reward ensemble trained in-process keeps these end-to-end runs quick; Ray has its own tests.
FAST = ("reward.members=2", "reward.epochs=1", "reward.channels=8", "reward.hidden=16", "ray.num_workers=0",
        "diffusion.epochs=1", "diffusion.steps=5", "diffusion.channels=8", "diffusion.blocks=1",
        "diffusion.batch_size=1024", "finetune.k=2", "finetune.steps=2", "finetune.batch_size=8",
        "finetune.methods=[strl,braid_bonus]", "eval.n_samples=32")


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *FAST, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_default_task_data_stage_end_to_end_and_reuse(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _launch(f"run.dir={run}")
    assert first.returncode == 0, first.stderr
    assert "D 65,536 | D_ora 0 | D_0 65,536 | D_off 32,768" in first.stdout
    assert "oracle      table: exact" in first.stdout
    for name in ("d.parquet", "d_ora.parquet", "d_0.parquet", "d_off.parquet", "summary.json", "stage.json"):
        assert (run / "data" / name).is_file(), name
    off = pd.read_parquet(run / "data" / "d_off.parquet")
    zero = pd.read_parquet(run / "data" / "d_0.parquet")
    assert len(off) == 32_768 and off["y"].max() < zero["y"].median() + 1e-12
    assert (run / "config.yaml").is_file() and (run / "oracle" / "info.json").is_file()
    assert (run / "reward" / "reward.safetensors").is_file() and "| bonus |" in first.stdout
    for name in ("report.md", "samples.parquet", "metrics.json", "designs.fasta", "scores.png", "training.png"):
        assert (run / "eval" / name).is_file(), name
    samples = pd.read_parquet(run / "eval" / "samples.parquet")
    assert set(samples["method"]) == {"Offline (top)", "Offline (random)", "Grad. (r_hat)", "Pretrained", "STRL",
                                      "BRAID-Bonus"}
    assert "| BRAID-Bonus | 32 |" in first.stdout

    before = (run / "data" / "d_off.parquet").stat().st_mtime_ns
    second = _launch(f"run.dir={run}")
    assert second.returncode == 0 and "data: reusing" in second.stderr and "reward: reusing" in second.stderr
    assert "pretrain: reusing" in second.stderr and "fine-tune braid_bonus: reusing" in second.stderr
    assert (run / "data" / "d_off.parquet").stat().st_mtime_ns == before


def test_changed_config_never_silently_overwrites(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _launch(f"run.dir={run}").returncode == 0
    before = (run / "data" / "d_off.parquet").read_bytes()
    changed = _launch(f"run.dir={run}", "data.quantile=0.3")
    assert changed.returncode == 2
    assert "data.quantile: 0.5 -> 0.3" in changed.stderr and "run.overwrite=true" in changed.stderr
    assert (run / "data" / "d_off.parquet").read_bytes() == before
    replaced = _launch(f"run.dir={run}", "data.quantile=0.3", "run.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr
    assert len(pd.read_parquet(run / "data" / "d_off.parquet")) < 32_768 * 0.7


def test_bad_input_stops_before_any_work_with_one_clear_line(tmp_path: Path) -> None:
    out = _launch(f"run.dir={tmp_path / 'run'}", "data.quantil=0.5")
    assert out.returncode == 2 and "unknown key data.quantil (did you mean data.quantile?)" in out.stderr
    missing = _launch(f"run.dir={tmp_path / 'run'}", "task.name=csv", f"task.path={tmp_path / 'none.csv'}",
                      "task.sequence_column=seq", "task.label_column=y")
    assert missing.returncode == 2 and "table not found" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "run" / "data").exists()


def test_user_table_with_a_trained_oracle(tmp_path: Path, enhancer_table: Path) -> None:
    run = tmp_path / "run"
    out = _launch("--config", str(ROOT / "configs" / "enhancer_csv.yaml"), f"run.dir={run}",
                  f"task.path={enhancer_table}", "data.quantile=0.8", "oracle.epochs=2", "oracle.channels=8",
                  "oracle.hidden=16", "oracle.layers=1")
    assert out.returncode == 0, out.stderr
    assert "D 120 | D_ora 60 | D_0 60 | D_off 48" in out.stdout and "held-out Pearson" in out.stdout
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
    import json

    run = tmp_path / "utr"
    out = _launch(f"run.dir={run}", "--config", str(ROOT / "configs" / "utr_mrl.yaml"), "task.subset=ci",
                  "finetune.methods=[strl]", "eval.grad_ascent=false")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    agreement = metrics["oracle_agreement"]
    assert agreement["secondary"]["kind"] == "kmer_ridge" and metrics["oracles"]["primary"]["kind"] == "optimus5p"
    strl = metrics["methods"]["STRL"]
    assert {"secondary_median", "both_frac_above_best", "oracle_spearman"} <= set(strl)
    assert strl["both_frac_above_best"] <= min(strl["frac_above_best"], strl["secondary_frac_above_best"])
    samples = pd.read_parquet(run / "eval" / "samples.parquet")
    assert samples["oracle_secondary"].notna().all()
    assert "An independent oracle beside the primary: kmer_ridge" in (run / "eval" / "report.md").read_text()

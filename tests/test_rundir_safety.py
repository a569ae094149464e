"""Nothing lost, nothing silently wrong in a run directory (issue 14): the evaluation is guarded like every
stage, the top-level config.yaml follows only accepted configs, one run at a time holds the directory, and a
file that cannot be read is named, with run.overwrite=true rebuilding its stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from braid_ray import pipeline
from braid_ray.rundir import RunDir, RunDirBusy, RunDirError, StageConflict, StageCorrupt
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run (all stages), copied by each test that changes it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    pipeline.run(tiny_config(f"run.dir={run}"))
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_a_changed_evaluation_is_a_conflict_and_replaces_nothing(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "eval").iterdir()}
    config_before = (run / "config.yaml").read_bytes()
    for change in ("eval.n_samples=16", "finetune.methods=[strl]"):
        with pytest.raises(StageConflict, match="eval was made with a different config"):
            pipeline.run(tiny_config(f"run.dir={run}", change))
    assert {p.name: p.read_bytes() for p in (run / "eval").iterdir()} == before
    assert (run / "config.yaml").read_bytes() == config_before  # a refused config is not recorded as the run's
    table = pipeline.run(tiny_config(f"run.dir={run}"))["eval"]  # unchanged: the evaluation is reused
    assert "| BRAID-Bonus |" in table
    replaced = pipeline.run(tiny_config(f"run.dir={run}", "eval.n_samples=16", "run.overwrite=true"))
    assert "| STRL | 16 |" in replaced["eval"]


def test_a_later_finetune_key_at_its_default_keeps_old_stages_and_set_is_a_conflict(finished: Path,
                                                                                      tmp_path: Path) -> None:
    """finetune.pretrained_last_steps came after runs had been recorded: at its default it is not in a stage's
    record (those stages stay reusable); set, it is a change of the fine-tuning, named in the conflict."""
    run = _copy(finished, tmp_path)
    record = json.loads((run / "finetune" / "strl" / "stage.json").read_text())["record"]
    assert "pretrained_last_steps" not in record["finetune"] and record["finetune"]["k"] >= 2
    with pytest.raises(StageConflict, match="finetune/strl was made with a different config.*pretrained_last_steps"):
        pipeline.run(tiny_config(f"run.dir={run}", "finetune.pretrained_last_steps=1"))



def test_pretrained_last_steps_reaches_the_trained_and_the_evaluated_policy(finished: Path) -> None:
    from braid_ray.evaluate import pretrained_models, tuned_policy
    from braid_ray.finetune.run import FinetuneJob, build_finetuner
    from braid_ray.stages import data_stage

    cfg = tiny_config(f"run.dir={finished}", "finetune.pretrained_last_steps=1")
    length = data_stage(cfg, RunDir(str(finished))).d.length
    tuner = build_finetuner(cfg, FinetuneJob(str(finished), "strl", length), seed=0)
    backbone, pretrained = pretrained_models(cfg, RunDir(str(finished)), length)
    evaluated = tuned_policy(cfg, RunDir(str(finished)), backbone, pretrained, "strl")
    for policy in (tuner.policy, evaluated):
        assert not policy.acts(1) and policy.acts(2)


def test_a_second_run_in_the_same_directory_stops_naming_the_holder(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    with run.lock():
        with pytest.raises(RunDirBusy, match=r"in use by pid \d+ on "):
            with run.lock():
                pass
        other = subprocess.run([sys.executable, "-c", "import sys; from braid_ray.rundir import RunDir\n"
                                f"with RunDir({str(tmp_path / 'run')!r}).lock(): pass"],
                               capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "RunDirBusy" in other.stderr and "in use by pid" in other.stderr
    with run.lock():  # released when the holder is done
        pass


def test_a_truncated_file_is_named_and_overwrite_rebuilds_its_stage(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    for path in (run / "reward" / "reward.safetensors", run / "finetune" / "strl" / "trainable.safetensors",
                 run / "data" / "d.parquet", run / "pretrain" / "stage.json"):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(StageCorrupt, match=r"data/d.parquet cannot be read .*run.overwrite=true"):
        pipeline.run(tiny_config(f"run.dir={run}"))
    summary = pipeline.run(tiny_config(f"run.dir={run}", "run.overwrite=true"))
    assert "| STRL |" in summary["eval"]
    for stage in ("data", "reward", "pretrain", "finetune/strl"):  # every stage loads again
        RunDir(str(run)).stage(stage).read_json("stage.json")
    pipeline.run(tiny_config(f"run.dir={run}"))


def test_an_unreadable_checkpoint_of_an_interrupted_fine_tuning_is_named(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    stage = run / "finetune" / "strl"
    (stage / "stage.json").rename(stage / "stage.pending.json")  # as an interrupted run leaves it
    (stage / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageCorrupt, match=r"finetune/strl: the interrupted run's checkpoint cannot be read"):
        pipeline.run(tiny_config(f"run.dir={run}", "run.overwrite=false"))
    pipeline.run(tiny_config(f"run.dir={run}", "run.overwrite=true"))  # starts that method again
    assert (stage / "stage.json").is_file()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        pipeline.run(tiny_config(f"run.dir={path}"))


def test_the_validity_rule_reads_its_limits_from_the_config(tmp_path: Path) -> None:
    """eval.hack_quantile / hack_min_run / hack_elbo_rows reach the rule (they were module constants)."""
    run = tmp_path / "run"
    pipeline.run(tiny_config(f"run.dir={run}", "eval.hack_quantile=0.3", "eval.hack_min_run=6",
                             "eval.hack_elbo_rows=100"))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["validity_rule"]["quantile"] == 0.3
    assert metrics["validity_rule"]["homopolymer_run"] == 6  # a 5-mer's runs are shorter: the floor decides
    assert metrics["elbo"]["data_rows"] == 100
    assert "(and at least 6)" in (run / "eval" / "report.md").read_text()


def test_a_dry_run_checks_the_table_and_split_and_writes_nothing(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    text = pipeline.check(tiny_config(f"run.dir={run}", "finetune.methods=[strl,braid_boot]"))
    assert "rows        D 1,024 | D_ora 0 | D_0 1,024 | D_off 512" in text
    assert "finished (reused when its config is unchanged, else a conflict): data, oracle, reward, pretrain, " \
           "finetune/strl, eval" in text and "to run: finetune/braid_boot" in text
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    fresh = tmp_path / "fresh"
    assert "to run: data, oracle" in pipeline.check(tiny_config(f"run.dir={fresh}")) and not fresh.exists()
    binary = tmp_path / "binary.csv"
    binary.write_text("seq,y\n" + "\n".join(f"{'ACGT'[i % 4]}{'ACGT'[i // 4 % 4]}{'ACGT'[i // 16 % 4]}"
                                             f"{'ACGT'[i // 64 % 4]}A,{i % 3 == 0:d}" for i in range(256)))
    with pytest.raises(ValueError, match="every D_off label is 0"):  # degenerate data fails the dry run too
        pipeline.check(tiny_config(f"run.dir={fresh}", "task.name=csv", f"task.path={binary}",
                                   "task.sequence_column=seq", "task.label_column=y", "oracle.kind=kmer_ridge"))


def test_launch_finetune_check_prints_the_dry_run_and_writes_nothing(tmp_path: Path) -> None:
    """`python launch/finetune.py --check ...`: the dry run from the command line, exit 0, no run directory."""
    from tests.tiny import FAST

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "launch/finetune.py", "--check", *FAST, f"run.dir={run}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rows        D 1,024 | D_ora 0 | D_0 1,024 | D_off 512" in done.stdout
    assert "to run: data, oracle, reward, pretrain, finetune/strl, finetune/braid_bonus, eval" in done.stdout
    assert "dry run     nothing was trained or written" in done.stdout and not run.exists()
    bad = subprocess.run([sys.executable, "launch/finetune.py", "--check", *FAST, f"run.dir={run}",
                          "data.quantile=2"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "data.quantile" in bad.stderr and not run.exists()


def test_a_bucket_run_dir_gets_the_report_fasta_and_plots_too(finished: Path, tmp_path: Path, monkeypatch) -> None:
    """On a cluster run.dir is a bucket: the evaluation draws its report, FASTA and plots in a local folder and
    uploads them. Here "bucket://run" is tmp_path/run through a filesystem that is not the local one."""
    import types

    import pyarrow.fs as pafs

    from braid_ray import rundir

    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "eval")
    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())

    class Bucket:
        @staticmethod
        def from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
            assert uri.startswith("bucket://")
            return bucket, uri.removeprefix("bucket://")

    fake = types.SimpleNamespace(**{k: getattr(pafs, k) for k in dir(pafs) if not k.startswith("_")})
    fake.FileSystem = Bucket
    monkeypatch.setattr(rundir, "pafs", fake)
    assert not RunDir("bucket://run").is_local()
    pipeline.run(tiny_config("run.dir=bucket://run"))
    for name in ("report.md", "designs.fasta", "scores.png", "samples.parquet", "metrics.json", "stage.json"):
        assert (run / "eval" / name).is_file(), name
    assert "![" in (run / "eval" / "report.md").read_text() and not list((run / "eval").glob(".*.tmp"))

"""The launch scripts' shared front: a user error is one line and exit code 2, its traceback with run.debug=true."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from braid_ray import cli
from braid_ray.config import ConfigError
from braid_ray.rundir import RunDirBusy, RunDirError, StageCorrupt
from tests.conftest import ROOT

BAD_TABLE = "t.csv line 3: letter 'N' at position 3 is not one of A, C, G, T"


def _bad_table() -> None:
    raise ValueError(BAD_TABLE)


def test_a_user_error_is_one_line_and_exit_code_2(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="braid_ray"), pytest.raises(SystemExit) as exit_:
        cli.run_main(_bad_table, argv=["--config", str(ROOT / "configs" / "tfbind8.yaml"), "run.seed=1"])
    assert exit_.value.code == 2
    assert [r.getMessage() for r in caplog.records] == [BAD_TABLE]


def test_run_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="letter 'N'"):
        cli.run_main(_bad_table, argv=["run.dir=x", "run.debug=true"])
    preset = tmp_path / "debug.yaml"
    preset.write_text("run: {debug: true}\n")
    with pytest.raises(ValueError, match="letter 'N'"):
        cli.run_main(_bad_table, argv=["--config", str(preset)])
    with pytest.raises(SystemExit):  # the override wins over the preset
        cli.run_main(_bad_table, argv=[f"--config={preset}", "run.debug=false"])


@pytest.mark.parametrize("argv, debug", [
    ([], False), (["run.debug=true"], True), (["run.debug=yes"], True), (["run.debug=1"], False),
    (["run.debug=[unclosed"], False), (["--config", "no/such/file.yaml"], False), (["run.debug"], False),
])
def test_run_debug_is_read_from_the_command_line_alone(argv: list[str], debug: bool) -> None:
    assert cli.debug_requested(argv) is debug


def test_a_bad_override_exits_2_with_one_line_or_raises_with_run_debug(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.parse("test", ["task.name=protein"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error: task.name: got 'protein', expected one of ['csv', 'dhs', 'tfbind5', 'tfbind8', 'utr_mrl']"]
    with pytest.raises(ConfigError, match="task.name: got 'protein'"):
        cli.parse("test", ["task.name=protein", "run.debug=true"])


@pytest.mark.parametrize("error", [RunDirBusy("run.dir /x is in use by pid 1 on h"),
                                   StageCorrupt("/x/reward/reward.safetensors cannot be read"),
                                   RunDirError("run.dir /x is a file, not a directory")])
def test_run_directory_errors_are_one_line_too(caplog, error: Exception) -> None:
    def fail() -> None:
        raise error

    with caplog.at_level(logging.ERROR, logger="braid_ray"), pytest.raises(SystemExit) as exit_:
        cli.run_main(fail, argv=[])
    assert exit_.value.code == 2 and [r.getMessage() for r in caplog.records] == [str(error)]

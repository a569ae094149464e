from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from braid_ray.config import Config, ConfigError, from_dict, load_config, parse_override, without_later_defaults
from tests.conftest import ROOT


# Presets of the one config (configs/sweeps/ holds sweep files, which have their own schema).
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_into_the_schema(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The resolved dict round-trips through YAML into the same config.
    assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_defaults_are_the_embedded_tfbind8_task() -> None:
    cfg = load_config()
    assert cfg.task.name == "tfbind8" and cfg.run.dir == "runs/tfbind8"


def test_overrides_parse_yaml_values_and_win_over_the_file() -> None:
    cfg = load_config(ROOT / "configs" / "utr_mrl.yaml",
                      ["data.quantile=0.7", "run.seed=3", "task.subset=ci", "oracle.lr=2e-3", "task.path=null"])
    assert cfg.data.quantile == 0.7 and cfg.run.seed == 3 and cfg.task.subset == "ci"
    assert cfg.oracle.lr == pytest.approx(2e-3) and cfg.task.path is None
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("override, message", [
    ("data.quantil=0.5", "unknown key data.quantil (did you mean data.quantile?)"),
    ("nosuch.key=1", "unknown key nosuch"),
    ("data.quantile=1.5", "data.quantile: got 1.5, expected a quantile strictly between 0 and 1"),
    ("data.quantile=0", "data.quantile: got 0.0, expected a quantile strictly between 0 and 1"),
    ("data.quantile=high", "data.quantile: got 'high', expected float or null"),
    ("run.seed=1.5", "run.seed: got 1.5, expected int"),
    ("run.overwrite=maybe", "run.overwrite: got 'maybe', expected bool"),
    ("task.name=protein", "task.name: got 'protein', expected one of ['csv', 'dhs', 'tfbind5', 'tfbind8', 'utr_mrl']"),
    ("task.subset=half", "task.subset: got 'half', expected 'full' | 'ci'"),
    ("oracle.kind=magic", "oracle.kind: got 'magic', expected one of"),
    ("oracle.epochs=0", "oracle.epochs: got 0, expected an integer >= 1"),
    ("data=3", "data: got 3, expected a mapping of keys"),
    ("data.quantile", "expected key=value"),
    ("data.scan_radius=0", "data.scan_radius: got 0, expected a Hamming distance >= 1"),
    ("data.wild_type=ACGT", "data.wild_type: got 'ACGT', expected null unless data.scan_radius is set"),
    ("finetune.pretrained_last_steps=20", "finetune.pretrained_last_steps: got 20, expected an integer in [0, "
                                          "finetune.k=20)"),
    ("finetune.pretrained_last_steps=-1", "finetune.pretrained_last_steps: got -1, expected an integer in [0, "),
])
def test_bad_keys_and_values_name_the_key_value_and_expected_form(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_csv_task_requires_its_table_and_columns() -> None:
    with pytest.raises(ConfigError, match="task.path: required for task.name=csv"):
        load_config(None, ["task.name=csv"])


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    flat = tmp_path / "flat.yaml"
    flat.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(flat)


def test_cluster_and_debug_settings_are_config_keys_off_by_default() -> None:
    cfg = load_config()
    assert cfg.ray.autoscaling is False and cfg.run.debug is False
    cfg = load_config(None, ["ray.autoscaling=true", "run.debug=true"])
    assert cfg.ray.autoscaling is True and cfg.run.debug is True
    with pytest.raises(ConfigError, match="ray.autoscaling: got 1, expected bool"):
        load_config(None, ["ray.autoscaling=1"])


def test_no_module_reads_its_settings_from_the_environment() -> None:
    """Configuration only through the config: no BRAID_* environment variable (they were BRAID_AUTOSCALING,
    BRAID_RAY_QUIET and BRAID_DEBUG: now ray.autoscaling, tracking.ray_logs for Ray's log lines, and run.debug)."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}"
             for path in sorted((ROOT / "braid_ray").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("BRAID_")]
    assert found == []


def test_a_later_finetune_key_at_its_default_compares_equal_to_a_record_without_it() -> None:
    old = {k: v for k, v in load_config().section("finetune")["finetune"].items() if k != "pretrained_last_steps"}
    now = load_config().section("finetune")["finetune"]
    assert old != now and without_later_defaults(now) == without_later_defaults(old) == old
    assert without_later_defaults({**now, "pretrained_last_steps": 1})["pretrained_last_steps"] == 1


def test_pretrained_last_steps_is_a_sequence_setting() -> None:
    assert load_config(None, ["finetune.pretrained_last_steps=1"]).finetune.pretrained_last_steps == 1
    with pytest.raises(ConfigError) as err:
        load_config(None, ["domain=image", "finetune.pretrained_last_steps=1"])
    assert "finetune.pretrained_last_steps: got 1, expected 0 with domain: image" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["finetune.pretrained_last_steps=1", "finetune.randomize_k=true"])
    assert "finetune.randomize_k: got True, expected false with finetune.pretrained_last_steps > 0" in str(err.value)

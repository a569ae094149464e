"""The report of benchmarks/quality.py: pairing by seed, the alpha each method's own oracle budget selects, and the
steering baselines against the fine-tuned methods at that alpha."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules["quality"] = quality
_spec.loader.exec_module(quality)


def _rows(selection: bool = True) -> pd.DataFrame:
    """Two seeds; STRL and BRAID-Boot at two alphas; DDOM without an alpha. On seed 0 the budget picks alpha 0.1
    for both methods although 0.01 has the higher (evaluated) median, so a report that picked by the median
    would differ."""
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for method, base in (("STRL", 0.5), ("BRAID-Boot", 0.6)):
            for alpha, median, score in ((0.01, 0.9, 0.2), (0.1, base, 0.3 if seed == 0 else 0.1)):
                rows.append({"task": "toy", "seed": seed, "method": method, "alpha": alpha, "median": median + shift,
                             "best_offline": 0.4, **({"selection_score": score} if selection else {})})
        rows.append({"task": "toy", "seed": seed, "method": "DDOM", "alpha": None, "median": 0.72 + shift,
                     "best_offline": 0.4, "setting": {"cfg_weight": 3.0}, "setting_queries": 512})
    return pd.DataFrame(rows)


def test_the_selected_alpha_is_the_highest_selection_score_not_the_highest_median() -> None:
    chosen = quality.at_selected_alpha(_rows(), "median").set_index(["seed", "method"])
    assert chosen.loc[(0, "STRL"), "alpha"] == 0.1 and chosen.loc[(0, "STRL"), "median"] == pytest.approx(0.5)
    assert chosen.loc[(1, "BRAID-Boot"), "alpha"] == 0.01 and chosen.loc[(1, "BRAID-Boot"), "median"] == 1.0
    assert quality.at_selected_alpha(_rows(selection=False), "median").empty


def test_braid_minus_strl_is_paired_by_seed_per_alpha() -> None:
    p = quality.paired(_rows(), "median", "BRAID-Boot").set_index("alpha")
    assert p.loc[0.1, "mean"] == pytest.approx(0.1) and p.loc[0.1, "seeds"] == 2 and p.loc[0.1, "wins"] == 2
    assert p.loc[0.01, "mean"] == pytest.approx(0.0) and p.loc[0.01, "wins"] == 0
    # t interval first, then the bootstrap: both seeds differ by exactly 0.1, so both have no width
    assert tuple(p.loc[0.1, ["t_lo", "t_hi", "lo", "hi"]]) == pytest.approx((0.1, 0.1, 0.1, 0.1))


def test_the_baselines_are_paired_with_each_method_at_its_selected_alpha() -> None:
    text = "\n".join(quality._baselines_section(_rows()))
    # DDOM minus STRL: seed 0 0.72 - 0.5 (alpha 0.1), seed 1 0.82 - 1.0 (alpha 0.01): mean +0.02, ahead in 1.
    assert "| DDOM | STRL | +0.020 |" in text and text.split("| DDOM | STRL |")[1].split("\n")[0].endswith("| 2 | 1 |")
    # DDOM minus BRAID-Boot: 0.72 - 0.6 and 0.82 - 1.0: mean -0.03.
    assert "| DDOM | BRAID-Boot | -0.030 |" in text
    assert "- DDOM: 0: cfg_weight 3 (512, by the plain mean); 1: cfg_weight 3 (512, by the plain mean)" in text
    rows = _rows().assign(selection_rule="valid")  # settings chosen by the validity-aware score: no mark
    assert "- DDOM: 0: cfg_weight 3 (512); 1: cfg_weight 3 (512)" in "\n".join(quality._baselines_section(rows))


def test_without_selection_scores_the_report_says_so_instead_of_an_empty_table() -> None:
    text = "\n".join(quality._baselines_section(_rows(selection=False)))
    assert "carries a selection score" in text and "| DDOM |" not in text


def test_the_report_has_a_section_per_task_with_every_row() -> None:
    text = quality.report(_rows())
    assert text.startswith("### toy (2 seeds: 0, 1;")
    assert "| STRL | 0.1 | 0.550 [0.500, 0.600] |" in text
    assert "| each at its selected alpha | +0.050 |" in text  # seed 0: 0.6 - 0.5; seed 1: 1.0 - 1.0


def test_the_backbones_are_compared_per_method_at_the_selected_alpha_and_paired_by_seed() -> None:
    gauss = _rows()
    masked = _rows().assign(task="toy_masked", median=lambda d: d["median"] + 0.05)
    masked.loc[(masked["seed"] == 1) & (masked["method"] == "STRL") & (masked["alpha"] == 0.1), "selection_score"] = 0.9
    text = quality.backbones(pd.concat([gauss, masked], ignore_index=True))
    assert text.startswith("### toy: the Gaussian one-hot backbone against the masked one (seeds 0, 1;")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.1/0.01 |" in rows[("STRL", "Gaussian")] and "| 0.1/0.1 |" in rows[("STRL", "masked")]
    # STRL masked minus Gaussian: seed 0 0.55 - 0.5, seed 1 (alpha 0.1 now) 0.65 - 1.0: mean -0.15, ahead in 1.
    # t interval with 1 degree of freedom: -0.15 -/+ 12.706 * 0.2828 / sqrt(2); the bootstrap's is the range.
    assert rows[("STRL", "masked")].endswith("| -0.150 | [-2.691, +2.391] | [-0.350, +0.050] | 2 | 1 |")
    assert rows[("DDOM", "masked")].endswith("| 2 | 2 |")
    assert rows[("STRL", "Gaussian")].endswith("|  |  |  |  |  |")  # the difference sits on the masked row only
    header, rule = text.splitlines()[2:4]
    assert header.count("|") == rule.count("|") == rows[("STRL", "masked")].count("|")
    assert quality.backbones(gauss) == ""


def test_selection_counts_hacked_designs_as_failures_where_every_alpha_was_scored_so() -> None:
    """At alpha 0.01 most selection designs are hacked: the plain mean prefers it, the validity-aware score does
    not. A (seed, method) whose alphas were not all scored by the validity-aware rule (rows from before it) is
    selected by the plain mean of every alpha, never by a mix of the two."""
    rows = [{"task": "toy", "seed": 0, "method": "STRL", "alpha": 0.01, "median": 0.9, "best_offline": 0.4,
             "selection_score": 0.1, "selection_score_raw": 0.95, "selection_rule": "valid"},
            {"task": "toy", "seed": 0, "method": "STRL", "alpha": 0.1, "median": 0.6, "best_offline": 0.4,
             "selection_score": 0.55, "selection_score_raw": 0.6, "selection_rule": "valid"}]
    chosen = quality.at_selected_alpha(pd.DataFrame(rows), "median")
    assert chosen.loc[0, "alpha"] == 0.1 and chosen.loc[0, "selected_by"] == "valid"
    rows[1] = {**rows[1], "selection_score": 0.6, "selection_rule": None}  # an older row: its score is the mean
    del rows[1]["selection_score_raw"]
    chosen = quality.at_selected_alpha(pd.DataFrame(rows), "median")
    assert chosen.loc[0, "alpha"] == 0.01 and chosen.loc[0, "selected_by"] == "raw"  # 0.95 > 0.6


def test_a_run_directory_gets_the_finished_upstream_stages_it_lacks_and_no_unfinished_one(tmp_path: Path) -> None:
    """A baseline trained upstream after an alpha's run directory was made is copied there (not retrained); one
    still training is not."""
    up, run = tmp_path / "upstream", tmp_path / "alpha0.1"
    for stage, marker in (("data", "stage.json"), ("baselines/ddom", "stage.json"),
                          ("baselines/cfg", "stage.pending.json")):
        (up / stage).mkdir(parents=True)
        (up / stage / marker).write_text("{}")
    (run / "baselines" / "ddom").mkdir(parents=True)
    (run / "baselines" / "ddom" / "stage.json").write_text('{"mine": 1}')
    for stage in ("data", "baselines"):
        quality._copy_missing(up / stage, run / stage)
    assert (run / "data" / "stage.json").is_file() and not (run / "baselines" / "cfg").exists()
    assert (run / "baselines" / "ddom" / "stage.json").read_text() == '{"mine": 1}'  # never replaced
    fresh = tmp_path / "alpha1"  # a new run directory: the folder of stages is merged too, never copied whole
    quality._copy_missing(up / "baselines", fresh / "baselines")
    assert (fresh / "baselines" / "ddom" / "stage.json").is_file() and not (fresh / "baselines" / "cfg").exists()
    (up / "baselines" / "cfg" / "stage.pending.json").rename(up / "baselines" / "cfg" / "stage.json")
    quality._copy_missing(up / "baselines", run / "baselines")
    assert (run / "baselines" / "cfg" / "stage.json").is_file()


def test_methods_added_at_an_evaluated_alpha_get_a_run_directory_of_their_own(tmp_path: Path) -> None:
    assert quality._alpha_folder(tmp_path, 0.01, "", ["braid_boot"]) == "alpha0.01"
    (tmp_path / "alpha0.01" / "eval").mkdir(parents=True)
    (tmp_path / "alpha0.01" / "eval" / "stage.pending.json").write_text("{}")  # unfinished: resumed in place
    assert quality._alpha_folder(tmp_path, 0.01, "", ["braid_boot"]) == "alpha0.01"
    (tmp_path / "alpha0.01" / "eval" / "stage.json").write_text("{}")
    assert quality._alpha_folder(tmp_path, 0.01, "", ["braid_boot"]) == "alpha0.01-braid_boot"
    assert quality._alpha_folder(tmp_path, 0.01, "K50", ["strl"]) == "alpha0.01-K50"


def test_rows_another_process_appended_meanwhile_are_not_appended_twice(tmp_path: Path, monkeypatch) -> None:
    """Two alphas of one seed in two processes: the alpha-free rows (Pretrained, ...) the other process appended
    after this one read the file are kept once; this process adds only its fine-tuned rows."""
    from braid_ray.config import load_config

    monkeypatch.setattr(quality.pipeline, "run", lambda cfg: None)  # the stages are already finished
    run = tmp_path / "alpha0.01"
    (run / "eval").mkdir(parents=True)
    (run / "finetune" / "strl").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "best_offline": 1.0, "selection": {"rule": "valid"}, "references": {"ref: poly-T": {"median": 0.1}},
        "methods": {"Pretrained": {"median": 0.5}, "STRL": {"median": 0.7}}}))
    (run / "finetune" / "strl" / "summary.json").write_text(json.dumps({"steps_run": 3, "stopped": "step cap"}))
    out = tmp_path / "rows.jsonl"
    done = quality._done(out)  # read at this process's start: empty
    for label, median in (("Pretrained", 0.5), ("ref: poly-T", 0.1)):  # then the other alpha's process appends
        quality._append(out, {"seed": 3, "alpha": None, "method": label, "median": median})
    quality._evaluate(load_config(None, ["run.seed=3"]), run, 0.01, ["strl"], out, done, "t", {})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["alpha"]) for r in rows] == [("Pretrained", None), ("ref: poly-T", None), ("STRL", 0.01)]
    assert rows[-1]["median"] == 0.7 and rows[-1]["ft_steps_run"] == 3


def test_the_rows_file_is_held_while_one_process_reads_and_appends(tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "rows.jsonl"
    with quality._held(out), out.open("a") as other:  # a second open file, as another process would have
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with out.open("a") as other:  # released after the block
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_method_is_compared_with_strl_at_the_nearest_whole_path_kl_not_the_same_alpha() -> None:
    rows = []
    for seed in (0, 1, 2):
        for method, alpha, kl, median in (("STRL", 1e-3, 200.0, 7.2), ("STRL", 3e-3, 20.0, 7.1),
                                          ("BRAID-Bonus", 1e-3, 14.0 + seed, 7.6 + 0.1 * seed),
                                          ("BRAID-Boot", 1e-3, 500.0, 7.3)):
            rows.append({"task": "toy", "seed": seed, "method": method, "alpha": alpha, "ft_kl": kl,
                         "median": median, "best_offline": 7.0})
    rows[0]["ft_kl"] = 16.0  # seed 0's STRL at 1e-3 is the nearer one there
    m = quality.at_matched_kl(pd.DataFrame(rows), "median", "BRAID-Bonus").iloc[0]
    assert m["base_alphas"] == [1e-3, 3e-3] and m["seeds"] == 3 and m["of"] == 3 and m["wins"] == 3
    assert m["mean"] == pytest.approx(((7.6 - 7.2) + (7.7 - 7.1) + (7.8 - 7.1)) / 3)
    assert m["base_kl"] == pytest.approx((16 + 20 + 20) / 3) and m["kl"] == pytest.approx(15.0)
    # BRAID-Boot's 500 nats are more than twice every STRL row's: no match, no row.
    assert quality.at_matched_kl(pd.DataFrame(rows), "median", "BRAID-Boot").empty
    text = quality.report(pd.DataFrame(rows).assign(selection_score=1.0))
    assert "BRAID-Bonus minus STRL at the nearest whole-path KL" in text
    assert "| 0.001 | 15 | 0.001, 0.003 | 18.7 | +0.567 |" in text and "| 3 of 3 | 3 |" in text
    one_strl_alpha = pd.DataFrame(rows).query("alpha == 1e-3 or method != 'STRL'").assign(selection_score=1.0)
    assert "at the nearest whole-path KL" not in quality.report(one_strl_alpha)  # the by-alpha table says it all

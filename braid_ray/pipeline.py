"""The whole pipeline for one config: data -> oracle (later issues: pretrain -> reward -> fine-tune -> evaluate).

Every stage is reused when its config and inputs are unchanged, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import logging

from braid_ray.config import Config
from braid_ray.rundir import RunDir
from braid_ray.stages import data_stage, oracle_stage

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Run every stage for ``cfg``; returns the summary that the launch script prints."""
    run_dir = RunDir(cfg.run.dir)
    data = data_stage(cfg, run_dir)
    oracle = oracle_stage(cfg, run_dir, data)
    run_dir.stage("").write_yaml("config.yaml", cfg.to_dict())
    return {"run_dir": run_dir.uri, "data": data.summary, "oracle": oracle.info}


def format_summary(summary: dict) -> str:
    d, o = summary["data"], summary["oracle"]
    rows = d["rows"]
    quality = ("exact (measured table)" if o.get("exact") else
               f"held-out Pearson {o['heldout_pearson']:.3f}" if "heldout_pearson" in o else
               f"Pearson vs measured {o['pearson_vs_measured']:.3f} (not held out)"
               if "pearson_vs_measured" in o else "")
    lines = [
        f"task        {d['task']}: {d['description']}",
        f"run dir     {summary['run_dir']}",
        f"rows        D {rows['D']:,} | D_ora {rows['D_ora']:,} | D_0 {rows['D_0']:,} | D_off {rows['D_off']:,}",
        f"D_off       y < {d['threshold']:.4g} (the {d['quantile']:.2f} quantile of y over D_0)",
        f"best D_off  y = {d['best_offline_y']:.4g}, percentile {d['best_offline_percentile']:.1f} of D",
        f"y over D    min {d['y_full']['min']:.4g} | median {d['y_full']['median']:.4g} | "
        f"max {d['y_full']['max']:.4g}",
        f"oracle      {o['kind']}: {quality}",
    ]
    return "\n".join(lines)

"""The evaluation stage: N designs per method, scored by an oracle the methods never saw.

Methods: Offline (top) = the N best rows of D_off by their measured y, Offline (random) = N random rows
of D_off, Grad. = gradient ascent on r_hat from Offline (top) (design-bench's reference optimiser, no
diffusion model), Pretrained, each fine-tuned method, and the steering baselines of ``baselines.methods`` (DDOM,
Offline Guidance, CFG: braid_ray/baselines/rows.py), each at the setting its own oracle budget chose. Writes
samples.parquet, designs.fasta, metrics.json, report.md and the plots to eval/.

Validity per design (``braid_ray.eval.validity``): every design gets its longest homopolymer, composition
entropy, GC and letter fractions, uATG count, Hamming distance to the nearest row of D and ELBO under the
pretrained model (``braid_ray.diffusion.likelihood``); a rule whose limits come from D marks it valid or
hacked, and the table reports each method's score over valid designs and with hacked designs counted as
failures. Reference rows (uniform random sequences, D's measured top 1%, poly-T) are scored and measured like
designs, so that a reader can see what each number means.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors

from braid_ray.baselines.grad import gradient_ascent
from braid_ray.baselines.rows import Context, baseline_rows, describe, grid, knob_json
from braid_ray.config import Config
from braid_ray.data.tables import Labelled
from braid_ray.diffusion.likelihood import ELBO_T_SAMPLES, elbo, unsupported
from braid_ray.diffusion.likelihood import describe as describe_elbo
from braid_ray.diffusion.pretrain import Backbone, build_backbone
from braid_ray.diffusion.sampler import FineTunedPolicy, rollout
from braid_ray.eval import (COLUMNS, KMER_TOP_FRACTION, KMER_TOP_MIN_ROWS, PER_DESIGN, ValidityRule,
                            design_statistics, method_metrics, results_table, samples_frame, score_distributions,
                            to_markdown, top_rows, training_curves, validity_metrics, validity_rule, write_fasta,
                            write_report)
from braid_ray.finetune.run import fine_tuned_policy, load_pretrained, load_reward
from braid_ray.methods import BASELINES, METHODS, label
from braid_ray.oracles import Oracle
from braid_ray.oracles.agreement import method_agreement
from braid_ray.reward.fit import score
from braid_ray.rundir import RunDir, stage_record
from braid_ray.stages import DataResult

log = logging.getLogger(__name__)

GRAD = "Grad. (r_hat)"
REF_RANDOM, REF_TOP, REF_POLY_T = "ref: uniform random", "ref: D top 1%", "ref: poly-T"
REFERENCE_TOP_FRACTION = 0.01  # the "measured top 1% of D" reference row (eval.reference_top_fraction)
UATG_TASKS = ("utr_mrl",)  # 5'UTR tasks: the table reports the mean uATG count (computed for every task)
SCORE_COLUMNS = COLUMNS + ["valid_share", "median_valid", "median_penalized", "above_best_valid"]
SECONDARY_COLUMNS = ["method", "median", "secondary_median", "frac_above_best", "secondary_frac_above_best",
                     "both_frac_above_best", "oracle_spearman"]
VALIDITY_COLUMNS = ["method", "valid_share", "homopolymer", "entropy", "gc", "nn_distance", "elbo", "uatg"]
# Selection (of alpha, or of any setting) spends an explicit oracle budget on designs of its own: SELECTION_QUERIES
# designs per method from a noise stream apart from the evaluation's, so no evaluated design chose the setting
# that it then scores. The sweep's budget (sweep.oracle_budget) is drawn from the same stream.
SELECTION_QUERIES = 64
SELECTION_STREAM = 13
# The selection score: the designs' mean oracle score with every design the validity rule calls hacked scored as
# the worst offline design, so a setting cannot win its selection by hacking (an oracle that shares the reward's
# blind spot scores poly-T high; the rule does not). "raw" (the plain mean) was the rule before 2026-12-04.
SELECTION_RULE = "valid"


def selection_seed(seed: int) -> int:
    """The seed of the selection designs' noise: a stream apart from the evaluation's (which uses ``seed``)."""
    return int(np.random.SeedSequence([seed, SELECTION_STREAM]).generate_state(1)[0])


def validity_check(rule: ValidityRule, reference_codes: np.ndarray,
                   elbo_fn: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[np.ndarray], np.ndarray]:
    """codes (N, L) -> valid (N,) bool under ``rule``: each design's statistics against ``reference_codes`` (D)
    and its ELBO by ``elbo_fn`` (None: a rule without an ELBO limit)."""
    def valid(codes: np.ndarray) -> np.ndarray:
        return rule.apply(design_statistics({"designs": codes}, reference_codes, elbo_fn)["designs"])[0]

    return valid


def selection_scores(scores: np.ndarray, valid: np.ndarray, worst_offline: float) -> dict[str, float]:
    """{"selection_score": the score of SELECTION_RULE, the mean of ``scores`` with each invalid design counted as
    ``worst_offline``; "selection_score_raw": the plain mean; "selection_valid_share"}."""
    return {"selection_score": float(np.where(valid, scores, worst_offline).mean()),
            "selection_score_raw": float(np.mean(scores)), "selection_valid_share": float(np.mean(valid))}


def selection_scorer(oracle: Oracle, valid: Callable[[np.ndarray], np.ndarray], worst_offline: float
                     ) -> Callable[[np.ndarray], dict[str, float]]:
    """codes (N, L) -> ``selection_scores`` of them: N oracle queries, validity by ``valid``."""
    return lambda codes: selection_scores(oracle.score(codes), valid(codes), worst_offline)


def selection_reference(cfg: Config, run: RunDir, data: DataResult, oracle: Oracle) -> dict:
    """What a sweep's trials judge their selection designs by, made once per sweep from its base run: the validity
    rule (as the evaluation makes it) and the oracle's worst offline design (|D_off| oracle queries, counted here,
    outside the trials' budgets)."""
    v = validity_setup(cfg, data.d, *pretrained_models(cfg, run, data.d.length))
    off = oracle.score(data.d.codes[data.splits.off])
    return {"rule": v.rule.to_dict(), "seed": cfg.run.seed, "worst_offline": float(off.min()),
            "oracle_queries": int(off.size)}


def reference_check(reference: dict, reference_codes: np.ndarray, backbone: Backbone, pretrained: torch.nn.Module
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """``validity_check`` under a recorded rule (``reference``: {"rule", "seed"}, from ``selection_reference`` or
    an evaluation's metrics.json), its ELBO limit applied with ``pretrained``'s ELBO on the noise of the seed that
    set the limit (the ELBO's sampled steps shift every estimate alike, so designs and D share them)."""
    rule = ValidityRule(**reference["rule"])
    elbo_fn = None if rule.min_elbo_nats is None else (
        lambda c: elbo(backbone, pretrained, c, t_samples=ELBO_T_SAMPLES, seed=reference["seed"]))
    return validity_check(rule, reference_codes, elbo_fn)


def pretrained_models(cfg: Config, run: RunDir, length: int) -> tuple[Backbone, torch.nn.Module]:
    """The backbone (as fine-tuning built it) and the pretrained denoiser of ``run``, on the CPU."""
    backbone = build_backbone(cfg.diffusion, length, cfg.finetune.temperature, cfg.finetune.straight_through)
    return backbone, load_pretrained(cfg, run.uri, length)


def baseline_queries(cfg: Config) -> int:
    """The oracle queries the baselines' settings cost: SELECTION_QUERIES per setting of each one's grid."""
    return SELECTION_QUERIES * sum(len(grid(cfg, BASELINES[m].kind)) for m in cfg.baselines.methods)


@torch.no_grad()
def sample_codes(policy: FineTunedPolicy, n: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n hard designs (codes (n, L)) from ``policy`` and the mean distance of its x0 from the one-hot vertices."""
    g = torch.Generator().manual_seed(seed)
    xs = [rollout(policy, min(batch, n - i), 1, g, use_checkpoint=False).x0 for i in range(0, n, batch)]
    x0 = torch.cat(xs)
    return policy.backbone.decode(x0).numpy().astype(np.int8), (x0.abs() - 1).abs().mean((1, 2)).numpy()


def reference_designs(d: Labelled, kmer_rows: np.ndarray, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The reference rows: n uniform random sequences; up to n rows (a seeded sample) of D's measured top 1% by
    y, without the 3-mer reference rows ``kmer_rows`` (their own profile would correlate with itself; all of
    the top 1% when nothing else is left); and one poly-T design."""
    top = np.setdiff1d(top_rows(d.y, REFERENCE_TOP_FRACTION), kmer_rows)
    if top.size == 0:
        top = top_rows(d.y, REFERENCE_TOP_FRACTION)
    if top.size > n:
        top = np.sort(rng.choice(top, size=n, replace=False))
    return {REF_RANDOM: rng.integers(0, 4, size=(n, d.length)).astype(np.int8), REF_TOP: d.codes[top],
            REF_POLY_T: np.full((1, d.length), 3, dtype=np.int8)}


def secondary_oracle(oracle: Oracle, designs: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                     off_codes: np.ndarray, best_offline: float, metrics: dict[str, dict], extra: dict,
                     methods: list[str]) -> dict:
    """With an independent oracle beside the primary (``oracle.secondary``): its scores of every design set, in
    each set's metrics (its median, its share above its own best offline design, the share above both oracles'
    best offline designs, and the two oracles' Spearman on the set) and in samples.parquet; returns the
    agreement summary ({} without a secondary). A design beats the data only when both oracles say so."""
    second = getattr(oracle, "secondary", None)
    if second is None:
        return {}
    other = {name: second.score(c) for name, c in designs.items()}
    best_2 = float(second.score(off_codes).max())
    agree = method_agreement({m: scores[m] for m in designs}, other, (best_offline, best_2))
    for name, row in agree["methods"].items():
        metrics[name].update({"secondary_median": row["secondary_median"],
                              "secondary_frac_above_best": row["secondary_frac_above_best"],
                              "both_frac_above_best": row["both_frac_above_best"], "oracle_spearman": row["spearman"]})
    extra["oracle_secondary"] = {m: other[m] for m in methods}
    return {**agree, "best_offline_secondary": best_2, "secondary": second.info}


def evaluate_stage(cfg: Config, run: RunDir, data: DataResult, oracle: Oracle, methods: list[str]) -> pd.DataFrame:
    """Sample, score and report every method; returns the results table (one row per method, then the
    reference rows). Guarded like every stage: a changed eval config, method list or upstream stage is a
    conflict, never a silent replacement of the report."""
    stage = run.stage("eval")
    trained = [f"baselines/{m}" for m in cfg.baselines.methods if BASELINES[m].kind == "conditional"]
    upstream = run.fingerprints(["data", "oracle", "reward", "pretrain", *(f"finetune/{m}" for m in methods),
                                 *trained])
    # Without baselines the record has no baselines section. The selection rule is part of it: an evaluation made
    # before the validity-aware selection (2026-12-04) is a conflict, not reused (run.overwrite=true replaces it).
    record = stage_record(cfg, ["eval", "baselines"] if cfg.baselines.methods else ["eval"], upstream,
                          methods=list(methods), selection=SELECTION_RULE)

    def reuse() -> pd.DataFrame:
        m = stage.read_json("metrics.json")
        return results_table({**m["methods"], **m["references"]})

    return stage.once(record, cfg, lambda: _evaluate(cfg, run, data, oracle, methods), reuse)


def tuned_policy(cfg: Config, run: RunDir, backbone: Backbone, pretrained: torch.nn.Module,
                 method: str) -> FineTunedPolicy:
    """The fine-tuned policy of stage finetune/<method>."""
    tuned = fine_tuned_policy(cfg, backbone, pretrained)
    tuned.trainable.load_state_dict(run.stage(f"finetune/{method}").load("trainable.safetensors", load_safetensors))
    return tuned


def rescore_selection(cfg: Config, run: RunDir, data: DataResult, oracle: Oracle) -> dict[str, dict[str, float]]:
    """The selection scores (``selection_scorer``) of a finished evaluation's fine-tuned methods, by label, on the
    same selection designs (the same stream) and under the validity rule and worst offline design its metrics.json
    recorded: for evaluations made before the validity-aware selection; SELECTION_QUERIES oracle queries each."""
    metrics = run.stage("eval").read_json("metrics.json")
    backbone, pretrained = pretrained_models(cfg, run, data.d.length)
    valid = reference_check({"rule": metrics["validity_rule"], "seed": cfg.run.seed}, data.d.codes, backbone,
                            pretrained)
    select = selection_scorer(oracle, valid, metrics["worst_offline"])
    out = {}
    for method in [m for m in METHODS if label(m) in metrics["methods"]]:
        chosen, _ = sample_codes(tuned_policy(cfg, run, backbone, pretrained, method), SELECTION_QUERIES,
                                 cfg.eval.batch_size, selection_seed(cfg.run.seed))
        out[label(method)] = select(chosen)
    return out


@dataclass(frozen=True)
class ValiditySetup:
    """The validity rule from D (``rule``), the ELBO function it was made with (None where the backbone has no
    ELBO: ``no_elbo`` says why) and the rows of D whose ELBO set its limit; the 3-mer reference rows of D and the
    reference designs (uniform random, D's top 1%, poly-T)."""

    rule: ValidityRule
    elbo_fn: Callable[[np.ndarray], np.ndarray] | None
    no_elbo: str | None
    elbo_rows: int
    kmer_rows: np.ndarray
    references: dict[str, np.ndarray]


def validity_setup(cfg: Config, d: Labelled, backbone: Backbone, pretrained: torch.nn.Module) -> ValiditySetup:
    """What the evaluation and a sweep's selection judge validity by; drawn on the stream [run.seed, 12], apart
    from the designs', so one seed gives the same rule everywhere."""
    kmer_rows = top_rows(d.y, KMER_TOP_FRACTION, KMER_TOP_MIN_ROWS)  # D's measured top 0.1%
    ref_rng = np.random.default_rng([cfg.run.seed, 12])
    references = reference_designs(d, kmer_rows, cfg.eval.n_samples, ref_rng)
    no_elbo = unsupported(backbone)
    if no_elbo:
        log.warning("validity without the ELBO: %s", no_elbo)

    def elbo_fn(c: np.ndarray) -> np.ndarray:
        return elbo(backbone, pretrained, c, t_samples=ELBO_T_SAMPLES, seed=cfg.run.seed)

    ev = cfg.eval
    elbo_sample = ref_rng.choice(len(d), size=min(ev.hack_elbo_rows, len(d)), replace=False)
    rule = validity_rule(d.codes, None if no_elbo else elbo_fn(d.codes[elbo_sample]), quantile=ev.hack_quantile,
                         min_run=ev.hack_min_run)
    return ValiditySetup(rule, None if no_elbo else elbo_fn, no_elbo, int(elbo_sample.size), kmer_rows, references)


def _evaluate(cfg: Config, run: RunDir, data: DataResult, oracle: Oracle, methods: list[str]) -> pd.DataFrame:
    stage = run.stage("eval")
    d, s, n = data.d, data.splits, cfg.eval.n_samples
    rng = np.random.default_rng(cfg.run.seed)
    off_codes, off_y = d.codes[s.off], d.y[s.off]
    codes: dict[str, np.ndarray] = {
        "Offline (top)": off_codes[np.argsort(-off_y)[:n]],
        "Offline (random)": off_codes[rng.choice(len(off_codes), size=min(n, len(off_codes)), replace=False)],
    }
    reward = load_reward(run.uri, "none", cfg.finetune.strength)
    if cfg.eval.grad_ascent:
        codes[GRAD] = gradient_ascent(reward, codes["Offline (top)"], cfg.eval.grad_steps, cfg.eval.grad_lr)
    backbone, pretrained = pretrained_models(cfg, run, d.length)
    policy = FineTunedPolicy(backbone, pretrained, cfg.finetune.parameterization)
    extra: dict[str, dict[str, np.ndarray]] = {"onehot_distance": {}}
    codes["Pretrained"], extra["onehot_distance"]["Pretrained"] = sample_codes(policy, n, cfg.eval.batch_size,
                                                                                cfg.run.seed)
    v = validity_setup(cfg, d, backbone, pretrained)
    rule, elbo_fn, kmer_rows, references = v.rule, v.elbo_fn, v.kmer_rows, v.references
    off_scores = oracle.score(off_codes)  # every offline design, scored like every design
    best_offline, worst_offline = float(off_scores.max()), float(off_scores.min())
    select = selection_scorer(oracle, validity_check(rule, d.codes, elbo_fn), worst_offline)
    curves, selection = {}, {}
    for method in methods:
        tuned = tuned_policy(cfg, run, backbone, pretrained, method)
        name = label(method)
        codes[name], extra["onehot_distance"][name] = sample_codes(tuned, n, cfg.eval.batch_size, cfg.run.seed)
        chosen, _ = sample_codes(tuned, SELECTION_QUERIES, cfg.eval.batch_size, selection_seed(cfg.run.seed))
        selection[name] = select(chosen)
        curves[name] = run.stage(f"finetune/{method}").read_parquet("history.parquet")
    # The steering baselines: each chooses its setting on its own selection designs, then samples the evaluated ones.
    started = time.perf_counter()
    baselines = baseline_rows(Context(cfg, run.uri, backbone, pretrained, reward, off_y),
                              lambda c: select(c)["selection_score"], SELECTION_QUERIES, cfg.run.seed,
                              selection_seed(cfg.run.seed))
    for name, row in baselines.items():
        codes[name], extra["onehot_distance"][name] = row.codes, row.onehot_distance
        selection[name] = {"selection_score": row.choice.score}
    if baselines:
        log.info("baselines %s: %.1f s (%d oracle queries for their settings)", ", ".join(baselines),
                 time.perf_counter() - started, sum(r.choice.queries for r in baselines.values()))
    scores = {name: oracle.score(c) for name, c in {**codes, **references}.items()}
    started = time.perf_counter()
    stats = design_statistics({**codes, **references}, d.codes, elbo_fn)
    log.info("validity statistics of %d designs: %.1f s", sum(len(st["entropy"]) for st in stats.values()),
             time.perf_counter() - started)
    extra["r_hat"], extra["g_hat"] = {}, {}
    for method in methods:
        name = label(method)
        extra["r_hat"][name], extra["g_hat"][name] = score(reward, codes[name], METHODS[method].penalty)
    for name in baselines:  # guidance: under the penalty it was guided by; DDOM and CFG read no reward (g_hat 0)
        penalty = cfg.baselines.guidance_penalty if name == BASELINES["guidance"].label else "none"
        extra["r_hat"][name], extra["g_hat"][name] = score(reward, codes[name], penalty)

    uatg = data.task.name in UATG_TASKS
    metrics, valid = {}, {}
    for name, c in {**codes, **references}.items():
        valid[name], reasons = rule.apply(stats[name])
        metrics[name] = {**method_metrics(c, scores[name], best_offline, d.codes[kmer_rows],
                                          novelty_reference=d.codes),
                         **validity_metrics(stats[name], valid[name], scores[name], best_offline, worst_offline,
                                            uatg=uatg)}
        if name in codes:
            for column in PER_DESIGN + ["elbo"]:
                extra.setdefault(column, {})[name] = stats[name].get(column, np.full(len(c), np.nan))
            extra.setdefault("valid", {})[name] = valid[name]
            extra.setdefault("invalid_because", {})[name] = reasons
    agreement = secondary_oracle(oracle, {**codes, **references}, scores, off_codes, best_offline, metrics, extra,
                                 list(codes))
    for name, value in selection.items():  # not columns of the table: numbers to choose settings by
        metrics[name].update(value)
    table = results_table(metrics)

    stage.write_parquet("samples.parquet", samples_frame(codes, {m: scores[m] for m in codes}, extra))
    stage.write_json("metrics.json", {
        "task": data.task.name, "oracle": oracle.info, "best_offline": best_offline, "worst_offline": worst_offline,
        "n_samples": n, "validity_rule": rule.to_dict(),
        "selection": {"queries": SELECTION_QUERIES, "metric": "selection_score", "stream": SELECTION_STREAM,
                      "rule": SELECTION_RULE,
                      "note": "mean oracle score of designs drawn apart from the evaluated ones, each design the "
                              "validity rule calls invalid counted as the worst offline design"},
        **({"baselines": {name: knob_json(row) for name, row in baselines.items()}} if baselines else {}),
        "elbo": {"t_samples": ELBO_T_SAMPLES, "data_rows": v.elbo_rows} if not v.no_elbo else
        {"unavailable": v.no_elbo},
        "kmer_reference": {"rows": int(kmer_rows.size), "fraction": KMER_TOP_FRACTION, "k": 3},
        "methods": {m: metrics[m] for m in codes}, "references": {m: metrics[m] for m in references},
        "oracles": getattr(oracle, "summary", {}), "oracle_agreement": agreement})
    # The report, FASTA and plots are drawn in a local folder: the stage's own, or for a bucket a temporary one
    # whose files are then uploaded beside samples.parquet.
    with tempfile.TemporaryDirectory() as scratch:
        out = stage.local_path() if run.is_local() else Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        write_fasta(codes, {m: scores[m] for m in codes}, out / "designs.fasta")
        plots = {"Oracle scores per method": score_distributions(
            {m: scores[m] for m in codes}, best_offline, out / "scores.png",
            f"{data.task.name}: {n} designs per method")}
        if curves:
            plots["r_hat and oracle over fine-tuning"] = training_curves(curves, out / "training.png")
        notes = [f"Oracle: {oracle.info.get('kind')} ({oracle.info.get('note', '')}).",
                 f"Best offline design (D_off, scored by the oracle): {best_offline:.4g}; worst: {worst_offline:.4g}.",
                 "Offline rows are real measured designs; generated designs are scored by the oracle only.",
                 *validity_notes(rule, d.length, len(d), kmer_rows.size, {m: len(c) for m, c in references.items()},
                                 worst_offline, v.elbo_rows, v.no_elbo, cfg.eval.hack_min_run,
                                 describe_elbo(backbone)),
                 *(describe(name, row) for name, row in baselines.items())]
        validity_table = table[[c for c in VALIDITY_COLUMNS if c in table.columns]]
        tables = {"Validity per design (medians; the rule is under Notes)": validity_table}
        if baselines:
            tables[f"The baselines' settings: each one's selection_score on {SELECTION_QUERIES} designs apart from "
                   "the evaluated ones; the chosen one (*) is evaluated"] = settings_table(baselines)
        if agreement:
            second = agreement["secondary"]
            tables[f"An independent oracle beside the primary: {second.get('kind')}, trained on D_ora only "
                   f"(its best offline design: {agreement['best_offline_secondary']:.4g}); a design beats the data "
                   "only when both oracles say so"] = table[[c for c in SECONDARY_COLUMNS if c in table.columns]]
        write_report(out, data.task.name, table[SCORE_COLUMNS], plots, notes, tables)
        if not run.is_local():
            for path in sorted(out.iterdir()):
                stage.write_bytes(path.name, path.read_bytes())
    log.info("evaluation (%d designs per method, oracle %s):\n%s", n, oracle.info.get("kind"), to_markdown(table))
    return table


def settings_table(baselines: dict) -> pd.DataFrame:
    """One row per setting a baseline tried: the method, the setting, its selection_score, whether it was chosen."""
    rows = [{"method": name, "setting": ", ".join(f"{k} {v:g}" for k, v in t.items() if k != "selection_score"),
             "selection_score": t["selection_score"],
             "chosen": "*" if {k: v for k, v in t.items() if k != "selection_score"} == row.choice.setting else ""}
            for name, row in baselines.items() for t in row.choice.trials]
    return pd.DataFrame(rows)


def validity_notes(rule: ValidityRule, length: int, n_data: int, n_kmer: int, n_refs: dict[str, int],
                   worst_offline: float, n_elbo: int, no_elbo: str | None, min_run: int,
                   elbo_what: str) -> list[str]:
    """The report's account of the validity rule, the 3-mer reference and the reference rows."""
    elbo_note = (f"ELBO: {elbo_what}; a model that draws every letter uniformly has "
                 f"log p = -L ln 4 = {-length * math.log(4):.1f} nats." if not no_elbo else
                 f"No ELBO: {no_elbo}; the rule has no likelihood part.")
    tail = f"{100 * rule.quantile:g}"
    return [f"Validity rule: a design is invalid (hacked) if {rule.describe(length)}. The limits come from D "
            f"({n_data:,} rows): a run longer than D's {100 - 100 * rule.quantile:g}th percentile (and at least "
            f"{min_run}), entropy and ELBO below D's {tail}{'st' if tail == '1' else 'th'} percentile "
            f"(the ELBO over {n_elbo:,} sampled rows of D), so about 1-3% of D's own rows fail it; the Offline rows "
            "show that level.",
            f"median_penalized scores each invalid design as the worst offline design ({worst_offline:.4g}): a "
            "method cannot raise it by hacking, and it equals the plain median when every design is valid.",
            f"3-mer reference (kmer_pearson): the measured top {n_kmer:,} rows of D by y (top "
            f"{KMER_TOP_FRACTION:.1%}, at least {KMER_TOP_MIN_ROWS}). Reference rows: {REF_RANDOM} "
            f"({n_refs[REF_RANDOM]} sequences, each letter uniform), {REF_TOP} ({n_refs[REF_TOP]} rows of D's "
            f"measured top {REFERENCE_TOP_FRACTION:.0%}, without the 3-mer reference rows), {REF_POLY_T} "
            f"(T x {length}); each is scored by the oracle and measured like a method's designs.",
            elbo_note]

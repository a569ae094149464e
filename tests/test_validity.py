"""Validity per design against hand-made sequences and brute force; the hacked rule; the 3-mer reference rows;
the ELBO against closed forms, a brute-force Monte Carlo of its definition, and a tiny trained model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from braid_ray.config import DiffusionConfig
from braid_ray.data.encoding import encode_strings
from braid_ray.data.tables import Labelled
from braid_ray.diffusion.denoiser import ConvDenoiser
from braid_ray.diffusion.gaussian import GaussianOneHotDiffusion
from braid_ray.diffusion.likelihood import (elbo, elbo_terms, final_step_kl, kl_weights, model_mean, posterior,
                                           strata, unsupported)
from braid_ray.diffusion.pretrain import pretrain
from braid_ray.eval import (KMER_TOP_FRACTION, KMER_TOP_MIN_ROWS, composition_entropy, design_statistics,
                            gc_fraction, kmer_pearson, letter_fractions, longest_homopolymer, motif_count,
                            nearest_hamming, top_rows, uatg_count, validity_metrics, validity_rule)
from braid_ray.eval import validity as validity_module
from braid_ray.evaluate import REF_POLY_T, REF_RANDOM, REF_TOP, reference_designs
from tests.conftest import ROOT

UTR_CI = ROOT / "braid_ray" / "assets" / "utr_mrl_sample2019" / "utr_mrl_ci_2k.csv"


def _codes(n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=(n, length)).astype(np.int8)


def _row_keys(codes: np.ndarray) -> np.ndarray:
    return np.array(["".join(map(str, row)) for row in codes])


@pytest.fixture(scope="module")
def utr() -> Labelled:
    """2,000 measured 50-nt 5'UTRs (the bundled CI subset of Sample et al. 2019): real rows."""
    frame = pd.read_csv(UTR_CI)
    return Labelled(encode_strings(list(frame["utr"])), frame["rl"].to_numpy(np.float64), str(UTR_CI))


# ------------------------------------------------------------------------------------------------
# Per-design statistics on hand-made sequences


def test_homopolymer_entropy_gc_and_uatg_on_hand_made_sequences() -> None:
    seqs = ["AAAAACGTTT", "ACGTACGTAC", "TTTTTTTTTT", "ACCGGGTTTT", "GCGCGCGCGC", "ATGATGCATG", "CCCCCCCCCA"]
    codes = encode_strings(seqs)
    np.testing.assert_array_equal(longest_homopolymer(codes), [5, 1, 10, 4, 1, 1, 9])
    np.testing.assert_array_equal(uatg_count(codes), [0, 0, 0, 0, 0, 3, 0])
    np.testing.assert_allclose(gc_fraction(codes), [0.2, 0.5, 0.0, 0.5, 1.0, 0.4, 0.9])
    np.testing.assert_allclose(letter_fractions(codes)[0], [0.5, 0.1, 0.1, 0.3])
    np.testing.assert_allclose(letter_fractions(codes).sum(1), 1.0)
    h = lambda *p: -sum(x * math.log2(x) for x in p if x)  # noqa: E731
    np.testing.assert_allclose(composition_entropy(codes),
                               [h(.5, .1, .1, .3), h(.3, .3, .2, .2), 0.0, h(.1, .2, .3, .4), 1.0, h(.3, .1, .3, .3),
                                h(.9, .1)])
    assert composition_entropy(encode_strings(["ACGT"]))[0] == pytest.approx(2.0)
    assert motif_count(encode_strings(["AAAA"]), "AA")[0] == 3 and motif_count(encode_strings(["CATGC"]), "AA")[0] == 0
    np.testing.assert_array_equal(uatg_count(encode_strings(["AT"])), [0])  # shorter than the motif
    with pytest.raises(ValueError, match="motif: expected a non-empty string over ACGT"):
        motif_count(codes, "AUG")


@pytest.mark.parametrize("n, n_ref, length", [(40, 300, 6), (25, 500, 30), (1, 1, 3)])
def test_nearest_hamming_matches_brute_force(n: int, n_ref: int, length: int, monkeypatch) -> None:
    monkeypatch.setattr(validity_module, "NN_QUERY_BLOCK", 7)  # several blocks on both sides
    monkeypatch.setattr(validity_module, "NN_REFERENCE_BLOCK", 64)
    reference = _codes(n_ref, length, seed=length)
    designs = _codes(n, length, seed=length + 1)
    designs[: n // 3] = reference[: n // 3]  # some designs in the reference: distance 0
    if n > 3:
        designs[n // 3] = reference[5]
        designs[n // 3, 0] = (designs[n // 3, 0] + 1) % 4  # one substitution away
    brute = np.array([min(int(np.sum(x != y)) for y in reference) for x in designs])
    np.testing.assert_array_equal(nearest_hamming(designs, reference), brute)
    if n > 3:
        assert brute[n // 3] <= 1 and (brute[: n // 3] == 0).all()


def test_design_statistics_split_one_search_back_per_method() -> None:
    reference = _codes(200, 12, 1)
    sets = {"a": reference[:5], "b": _codes(9, 12, 2), "c": np.full((2, 12), 3, np.int8)}
    stats = design_statistics(sets, reference, elbo=lambda c: -np.arange(len(c), dtype=float))
    assert list(stats) == ["a", "b", "c"]
    for name, c in sets.items():
        np.testing.assert_array_equal(stats[name]["nn_distance"], nearest_hamming(c, reference))
        np.testing.assert_array_equal(stats[name]["homopolymer"], longest_homopolymer(c))
        np.testing.assert_array_equal(stats[name]["elbo"], -np.arange(len(c)))
        assert set(stats[name]) == set(validity_module.PER_DESIGN) | {"elbo"}
    assert (stats["a"]["nn_distance"] == 0).all() and (stats["c"]["homopolymer"] == 12).all()


# ------------------------------------------------------------------------------------------------
# The hacked rule


def test_rule_flags_poly_t_and_keeps_real_rows(utr: Labelled) -> None:
    rule = validity_rule(utr.codes)
    assert rule.homopolymer_run == 8  # the fixed floor; D's 99th percentile run is shorter
    assert 1.7 < rule.min_entropy_bits < 1.9
    real = rule.apply(design_statistics({"d": utr.codes}, utr.codes)["d"])[0]
    assert 0.97 <= real.mean() < 1.0  # ~1% of D fails each data-relative part, by construction
    poly_t = np.full((1, 50), 3, np.int8)
    mostly_t = encode_strings(["T" * 30 + "ACGTG" * 4])  # run 30
    t_rich = encode_strings(["TTATTCTTGT" * 5])  # no long run, but 70% T: low entropy
    stats = design_statistics({"poly-T": poly_t, "mostly-T": mostly_t, "T-rich": t_rich}, utr.codes)
    for name, reasons in [("poly-T", "homopolymer,entropy"), ("mostly-T", "homopolymer,entropy"),
                          ("T-rich", "entropy")]:
        valid, why = rule.apply(stats[name])
        assert not valid[0] and why[0] == reasons, name
    random = rule.apply(design_statistics({"r": _codes(2000, 50, 3)}, utr.codes)["r"])[0]
    assert random.mean() > 0.98


def test_rule_elbo_part_and_short_sequences() -> None:
    every_8mer = np.array(list(itertools.product(range(4), repeat=8)), dtype=np.int8)
    rule = validity_rule(every_8mer, reference_elbo=np.arange(100.0))
    # TFBind8: a fixed scaled-down limit (runs of 4 are in 6% of all 8-mers) would call D itself hacked.
    assert rule.homopolymer_run == 8 and rule.min_elbo_nats == pytest.approx(0.99)
    stats = {"homopolymer": longest_homopolymer(every_8mer), "entropy": composition_entropy(every_8mer),
             "elbo": np.full(len(every_8mer), 50.0)}
    valid, why = rule.apply(stats)
    assert 0.99 <= valid.mean() < 1.0 and set(why[~valid]) <= {"homopolymer,entropy", "entropy"}
    picked = [0, *np.flatnonzero(valid)[:2]]  # AAAAAAAA, and two rows valid so far
    stats["elbo"][picked] = 0.5
    valid, why = rule.apply(stats)
    assert list(why[picked]) == ["homopolymer,entropy,elbo", "elbo", "elbo"] and not valid[picked].any()
    with pytest.raises(ValueError, match="no 'elbo'"):
        rule.apply({k: v for k, v in stats.items() if k != "elbo"})
    genomic = np.concatenate([np.full((50, 20), 0, np.int8), _codes(50, 20)])  # half the data is poly-A
    assert validity_rule(genomic).homopolymer_run == 21  # never more strict than the data itself


def test_validity_metrics_count_hacked_designs_as_failures() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    valid = np.array([True, False, True, False])
    stats = {"homopolymer": np.array([2, 50, 3, 9]), "entropy": np.array([2.0, 0.0, 1.9, 1.0]),
             "gc": np.array([.5, 0, .4, .1]), "nn_distance": np.array([0, 20, 3, 4]),
             "elbo": np.array([-70.0, -500, -60, -90]), "uatg": np.array([1, 0, 2, 0])}
    m = validity_metrics(stats, valid, scores, best_offline=2.5, worst_offline=0.0, uatg=True)
    assert m["valid_share"] == 0.5 and m["median_valid"] == 2.0
    assert m["median_penalized"] == 0.5  # median of (1, 0, 3, 0)
    assert m["above_best_valid"] == 0.25  # 3 (valid) counts, 4 (hacked) does not
    assert (m["homopolymer"], m["nn_distance"], m["elbo"], m["uatg"]) == (6.0, 3.5, -80.0, 0.75)
    none = validity_metrics(stats, np.zeros(4, bool), scores, 2.5, 0.0)
    assert np.isnan(none["median_valid"]) and none["median_penalized"] == 0.0 and "uatg" not in none


# ------------------------------------------------------------------------------------------------
# The 3-mer reference rows


def test_kmer_reference_rows_mean_what_they_say() -> None:
    # A table where y rewards T-content, like the oracle the review caught: its top rows are T-rich.
    rng = np.random.default_rng(0)
    p_t = rng.uniform(0.1, 0.5, size=20_000)
    u = rng.random((20_000, 30))
    codes = np.where(u < p_t[:, None], 3, rng.integers(0, 3, size=(20_000, 30))).astype(np.int8)
    d = Labelled(codes, (codes == 3).mean(1) + rng.normal(0, 0.02, 20_000), "synthetic")
    kmer_rows = top_rows(d.y, KMER_TOP_FRACTION, KMER_TOP_MIN_ROWS)
    assert len(kmer_rows) == 20 and d.y[kmer_rows].min() >= np.quantile(d.y, 0.999)
    refs = reference_designs(d, kmer_rows, 640, np.random.default_rng(1))
    assert [len(refs[k]) for k in (REF_RANDOM, REF_TOP, REF_POLY_T)] == [640, 180, 1]
    assert not np.isin(_row_keys(refs[REF_TOP]), _row_keys(d.codes[kmer_rows])).any()  # held out
    r = {k: kmer_pearson(c, d.codes[kmer_rows]) for k, c in refs.items()}
    assert abs(r[REF_RANDOM]) < 0.3 and r[REF_TOP] > 0.8 and r[REF_TOP] > r[REF_RANDOM] + 0.5


def test_kmer_reference_rows_on_real_utrs(utr: Labelled) -> None:
    kmer_rows = top_rows(utr.y, KMER_TOP_FRACTION, KMER_TOP_MIN_ROWS)  # 0.1% of 2,000 < 10 rows: the minimum
    assert len(kmer_rows) == 10 and set(utr.y[kmer_rows]) == set(np.sort(utr.y)[-10:])
    refs = reference_designs(utr, kmer_rows, 640, np.random.default_rng(0))
    assert not np.isin(_row_keys(refs[REF_TOP]), _row_keys(utr.codes[kmer_rows])).any()  # held out
    r = {k: kmer_pearson(c, utr.codes[kmer_rows]) for k, c in refs.items()}
    assert abs(r[REF_RANDOM]) < 0.2 and r[REF_TOP] > 0.35 and r[REF_POLY_T] < 0.0


# ------------------------------------------------------------------------------------------------
# The ELBO


class PointDenoiser(nn.Module):
    """The exact noise predictor of data that is the single point x0*: eps = (x_t - sqrt(ab_t) x0*) / sqrt(1 - ab_t)."""

    def __init__(self, x0_star: torch.Tensor, alpha_bar: torch.Tensor):
        super().__init__()
        self.register_buffer("x0", x0_star)
        self.register_buffer("alpha_bar", alpha_bar.float())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t][:, None, None]
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def _closed_form(backbone: GaussianOneHotDiffusion, star: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """ELBO under PointDenoiser(star), worked out by hand: x0_hat = x0* at every x_t, so eps - eps_hat =
    sqrt(ab_t / (1 - ab_t)) (x0* - x0) is noise-free and mu_q - mu_theta = (sqrt(ab_{t-1}) - c_t sqrt(ab_t /
    (1 - ab_t))) (x0 - x0*), with ||x0 - x0*||^2 = 8 per differing position."""
    s = backbone.schedule
    ab, sigma2, big_t = [float(a) for a in s.alpha_bar], [float(v) for v in s.sigma2], s.steps
    length = codes.shape[1]
    prior = torch.distributions.kl_divergence(
        torch.distributions.Normal(math.sqrt(ab[big_t]), math.sqrt(1 - ab[big_t])),
        torch.distributions.Normal(0.0, 1.0)).item() * 4 * length
    out = []
    for row in codes:
        differing = int(np.sum(row != star))
        kl = sum((math.sqrt(ab[t - 1]) - math.sqrt(1 - ab[t - 1] - sigma2[t]) * math.sqrt(ab[t] / (1 - ab[t]))) ** 2
                 * 8 * differing / (2 * sigma2[t]) for t in range(2, big_t + 1))
        logits = 2 * (2 * np.eye(4)[star] - 1) / sigma2[1]  # 2 mu / sigma_1^2 with mu = x0*
        log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        out.append(log_p[np.arange(length), row].sum() - kl - prior)
    return np.array(out)


@pytest.mark.parametrize("steps, eta", [(6, 1.0), (6, 0.5), (1, 1.0)])
def test_elbo_equals_the_closed_form_of_an_exact_denoiser(steps: int, eta: float) -> None:
    backbone = GaussianOneHotDiffusion(5, steps, eta)
    star = np.array([0, 1, 2, 3, 3])
    model = PointDenoiser(backbone.encode(torch.from_numpy(star)[None]), backbone.schedule.alpha_bar)
    codes = np.stack([star, [0, 1, 2, 3, 0], [3, 3, 3, 3, 3], [1, 0, 3, 2, 2]])
    expected = _closed_form(backbone, star, codes)
    terms = elbo_terms(backbone, model, codes, t_samples=50, seed=3)  # t_samples >= T - 2: every t, exactly
    np.testing.assert_allclose(terms["elbo"], expected, rtol=1e-5, atol=1e-5)  # float32 denoiser
    assert terms["diffusion"][0] == pytest.approx(0, abs=1e-8)  # x0 = x0*: the denoiser is exact, no KL
    assert terms["elbo"][0] > terms["elbo"][1] > terms["elbo"][2] and (terms["elbo"] <= 0).all()
    if steps > 1:
        # Stratified sampling of t is unbiased: its mean over seeds is the exact sum.
        for common in (True, False):
            draws = np.stack([elbo(backbone, model, codes, t_samples=2, seed=s, common_noise=common)
                              for s in range(300)])
            np.testing.assert_allclose(draws.mean(0), expected, rtol=0.03)
            assert draws[:, 1:].std(0).min() > 0  # and really sampled


def test_elbo_batches_and_seeds() -> None:
    backbone = GaussianOneHotDiffusion(6, 10)
    torch.manual_seed(0)
    model = ConvDenoiser(6, channels=8, blocks=1, emb_dim=8)
    codes = _codes(37, 6, 4)
    a = elbo(backbone, model, codes, seed=1)
    np.testing.assert_array_equal(a, elbo(backbone, model, codes, seed=1))
    assert not np.array_equal(a, elbo(backbone, model, codes, seed=2))
    # Common random numbers: a row's value depends on the row and the seed only, not on the batch or its neighbours.
    np.testing.assert_allclose(elbo(backbone, model, codes, seed=1, batch_size=10 * 4), a, rtol=1e-6)
    np.testing.assert_allclose(elbo(backbone, model, codes[::-1], seed=1)[::-1], a, rtol=1e-6)
    repeated = elbo(backbone, model, np.repeat(codes[:1], 5, 0), seed=1, common_noise=False)
    assert np.unique(repeated).size == 5  # independent draws per row
    assert [len(s) for s in strata(50, 8)] == [6] * 8 and strata(2, 8) == [] and len(strata(5, 8)) == 3
    with pytest.raises(ValueError, match="final_draws: expected at least one draw"):
        elbo(backbone, model, codes, final_draws=0)
    assert "eta in (0, 1]" in unsupported(GaussianOneHotDiffusion(6, 10, eta=0.0))
    with pytest.raises(ValueError, match=r"expected integer codes of shape \(N, 6\)"):
        elbo(backbone, model, _codes(2, 5))


@pytest.mark.parametrize("clip", [False, True])
def test_posterior_and_model_mean_are_ddpm_and_the_policy(clip: bool) -> None:
    backbone = GaussianOneHotDiffusion(4, 7, eta=1.0, clip_x0=clip)
    s = backbone.schedule
    torch.manual_seed(1)
    model = ConvDenoiser(4, channels=8, blocks=1, emb_dim=8).eval()
    x0 = backbone.encode(torch.from_numpy(_codes(3, 4)))
    for t in range(1, 8):
        x_t = torch.randn(3, 4, 4)
        tt = torch.full((3,), t)
        with torch.no_grad():
            mean, sigma = backbone.policy(model, x_t, t)
            ours = model_mean(s, model(x_t, tt), x_t, tt, clip_x0=clip)
        torch.testing.assert_close(ours.float(), mean, atol=1e-5, rtol=1e-5)
        if t >= 2:  # eta = 1: q_sigma is DDPM's posterior (Ho et al. eq. 7)
            ab, ab_prev = float(s.alpha_bar[t]), float(s.alpha_bar[t - 1])
            beta = 1 - ab / ab_prev
            ddpm_mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 \
                + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x_t
            q_mean, q_var = posterior(s, x0, x_t, tt)
            torch.testing.assert_close(q_mean.float(), ddpm_mean, atol=1e-5, rtol=1e-5)
            assert q_var[0].item() == pytest.approx((1 - ab_prev) / (1 - ab) * beta) == sigma**2


def test_elbo_matches_a_monte_carlo_of_its_definition() -> None:
    """E_q[log p(codes, x_{1:T}) - log q(x_{1:T} | x_0)] by sampling whole trajectories from q and evaluating
    every Gaussian density, against the estimator's analytic KLs (both averaged over 20,000 draws)."""
    length, steps, m = 2, 3, 20_000
    backbone = GaussianOneHotDiffusion(length, steps, eta=0.8, clip_x0=False)  # the ELBO is the unclipped bound
    s = backbone.schedule
    torch.manual_seed(2)
    model = ConvDenoiser(length, channels=8, blocks=1, emb_dim=8).eval()
    codes = np.array([[0, 3]])
    x0 = backbone.encode(torch.from_numpy(codes)).expand(m, length, 4)
    g = torch.Generator().manual_seed(0)
    normal = lambda x, mu, var: torch.distributions.Normal(mu, math.sqrt(var)).log_prob(x).sum((1, 2))  # noqa: E731
    ab = [float(a) for a in s.alpha_bar]
    x = math.sqrt(ab[steps]) * x0 + math.sqrt(1 - ab[steps]) * torch.randn(x0.shape, generator=g)
    log_w = normal(x, torch.zeros_like(x), 1.0) - normal(x, math.sqrt(ab[steps]) * x0, 1 - ab[steps])
    with torch.no_grad():
        for t in range(steps, 1, -1):
            var = float(s.sigma2[t])
            eps = (x - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
            q_mean = math.sqrt(ab[t - 1]) * x0 + math.sqrt(1 - ab[t - 1] - var) * eps
            x_prev = q_mean + math.sqrt(var) * torch.randn(x.shape, generator=g)
            p_mean, sigma = backbone.policy(model, x, t)
            log_w += normal(x_prev, p_mean, sigma**2) - normal(x_prev, q_mean, var)
            x = x_prev
        mu, sigma = backbone.policy(model, x, 1)  # the decoder: N(mu, sigma_1^2) on the 4 vertices, renormalised
    vertices = 2 * torch.eye(4) - 1
    log_v = -((vertices[None, None] - mu[:, :, None]) ** 2).sum(-1) / (2 * sigma**2)  # (m, L, 4)
    log_w += (log_v - torch.logsumexp(log_v, -1, keepdim=True))[:, torch.arange(length), codes[0]].sum(1)
    estimate = elbo(backbone, model, np.repeat(codes, m, 0), seed=5, common_noise=False, final_draws=1024)
    se = math.sqrt(log_w.var().item() / m + estimate.var() / m)
    assert abs(log_w.mean().item() - estimate.mean()) < 5 * se
    assert se < 0.05 * abs(estimate.mean())  # a test with teeth: the two agree to a few percent


def test_final_step_importance_sampling_matches_direct_sampling() -> None:
    """The shared-draw estimate of E_{q(x_T | x_0)} KL_T against drawing x_T from q(x_T | x_0) itself, on a schedule
    where x_T depends on x_0 enough for the importance weights to matter (ab_T = 0.1 instead of ~1e-6)."""
    backbone = GaussianOneHotDiffusion(2, 2)
    s = backbone.schedule
    s.alpha_bar = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    s.sigma2 = torch.tensor([0.0, 0.5, 0.5 / 0.9 * 0.8], dtype=torch.float64)  # DDPM's posterior variance at t = 2
    torch.manual_seed(4)
    model = ConvDenoiser(2, channels=8, blocks=1, emb_dim=8).eval()
    codes = torch.tensor([[0, 3], [2, 2]])
    m, w_t, steps = 20_000, float(kl_weights(s)[2]), torch.full((20_000,), 2)
    with torch.no_grad():
        shared = final_step_kl(backbone, model, codes, m, torch.Generator().manual_seed(0), torch.device("cpu"), 4096)
        moved = []
        for i, x0 in enumerate(backbone.encode(codes)):
            eps = torch.randn(m, 2, 4, generator=torch.Generator().manual_seed(i + 1))
            kl = w_t * ((eps - model(math.sqrt(0.1) * x0 + math.sqrt(0.9) * eps, steps)) ** 2).sum((1, 2))
            direct, se = kl.mean().item(), kl.std().item() / math.sqrt(m)
            assert abs(shared[i] - direct) < 5 * se + 0.01 * direct
            # Without the weights (x_T from N(0, (1 - ab_T) I) as is), the estimate would be off by several percent.
            unweighted = w_t * ((eps - math.sqrt(1 / 9) * x0 - model(math.sqrt(0.9) * eps, steps)) ** 2).sum((1, 2))
            moved.append(abs(unweighted.mean().item() - direct) / direct)
    assert max(moved) > 0.05


def test_elbo_ranks_a_tiny_models_samples_above_random_sequences() -> None:
    length = 6
    rng = np.random.default_rng(0)
    consensus = np.array([0, 1, 2, 3, 0, 2])
    data = np.where(rng.random((3000, length)) < 0.85, consensus, rng.integers(0, 4, (3000, length))).astype(np.int8)
    backbone = GaussianOneHotDiffusion(length, 10)
    torch.manual_seed(0)
    model = ConvDenoiser(length, channels=16, blocks=1, emb_dim=16)
    cfg = DiffusionConfig(steps=10, channels=16, blocks=1, epochs=15, batch_size=128, lr=3e-3)
    pretrain(model, backbone, data, cfg, seed=0)
    model.eval()
    samples = backbone.decode(backbone.sample(model, 300, torch.Generator().manual_seed(1))).numpy()
    assert np.mean(samples == consensus) > 0.4  # the model learnt something of the data (uniform: 0.25)
    own, random = elbo(backbone, model, samples), elbo(backbone, model, _codes(300, length, 9))
    assert np.median(own) > np.median(random) + 5.0  # nats
    assert np.mean(own > np.median(random)) > 0.7
    assert np.median(elbo(backbone, model, data[:300])) > np.median(random) + 5.0
    best, worst = elbo(backbone, model, np.stack([consensus, (consensus + 2) % 4]))
    assert best > worst + 20.0
    assert (own <= 0).all() and (random <= 0).all()  # a bound on the log-probability of a discrete sequence

"""Evaluation of designed sequences: metrics per method, validity per design, figures, the results table and
report.md.

Pure functions over int codes (N, L) and oracle scores (N,); nothing here trains, samples or queries an oracle
(the ELBO under the pretrained model is ``braid_ray.diffusion.likelihood``, passed in as a function).
"""

from braid_ray.eval.metrics import (KMER_TOP_FRACTION, KMER_TOP_MIN_ROWS, distinct, kmer_frequencies, kmer_pearson,
                                    mean_pairwise_hamming, method_metrics, novelty, score_table, top_rows)
from braid_ray.eval.plots import score_distributions, training_curves
from braid_ray.eval.report import (COLUMNS, results_table, samples_frame, to_markdown, write_fasta,
                                   write_report)
from braid_ray.eval.validity import (ELBO_DATA_ROWS, HOMOPOLYMER_MIN_RUN, PER_DESIGN, VALIDITY_QUANTILE,
                                     ValidityRule, composition_entropy, design_statistics, gc_fraction,
                                     letter_fractions, longest_homopolymer, motif_count, nearest_hamming,
                                     uatg_count, validity_metrics, validity_rule)

__all__ = ["COLUMNS", "ELBO_DATA_ROWS", "HOMOPOLYMER_MIN_RUN", "KMER_TOP_FRACTION", "KMER_TOP_MIN_ROWS", "PER_DESIGN",
           "VALIDITY_QUANTILE", "ValidityRule", "composition_entropy", "design_statistics", "distinct", "gc_fraction",
           "kmer_frequencies", "kmer_pearson", "letter_fractions", "longest_homopolymer", "mean_pairwise_hamming",
           "method_metrics", "motif_count", "nearest_hamming", "novelty", "results_table", "samples_frame",
           "score_distributions", "score_table", "to_markdown", "top_rows", "training_curves", "uatg_count",
           "validity_metrics", "validity_rule", "write_fasta", "write_report"]

"""Evaluation of designed sequences: metrics per method, figures, the results table and report.md.

Pure functions over int codes (N, L) and oracle scores (N,); nothing here trains, samples or queries an oracle.
"""

from braid_ray.eval.metrics import (distinct, kmer_frequencies, kmer_pearson, mean_pairwise_hamming, method_metrics,
                                    novelty, score_table)
from braid_ray.eval.plots import score_distributions, training_curves
from braid_ray.eval.report import (COLUMNS, results_table, samples_frame, to_markdown, write_fasta,
                                   write_report)

__all__ = ["COLUMNS", "distinct", "kmer_frequencies", "kmer_pearson", "mean_pairwise_hamming", "method_metrics",
           "novelty", "results_table", "samples_frame", "score_distributions", "score_table", "to_markdown",
           "training_curves", "write_fasta", "write_report"]

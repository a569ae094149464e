"""BRAID fine-tuning: the KL-regularised objective and the training loop."""

from braid_ray.finetune.trainer import FineTuner, StepMetrics

__all__ = ["FineTuner", "StepMetrics"]

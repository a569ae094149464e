"""Networks: sequence CNNs for oracles and reward models."""

from braid_ray.models.cnn import SequenceCNN

__all__ = ["SequenceCNN"]

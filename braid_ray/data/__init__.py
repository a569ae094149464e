"""Sequence data: encoding and validation, the task registry, the offline split protocol."""

from braid_ray.data.encoding import ALPHABET, decode, encode, one_hot
from braid_ray.data.splits import Splits, offline_splits, summarize
from braid_ray.data.tables import Labelled
from braid_ray.data.tasks import TASKS, Task, get_task

__all__ = ["ALPHABET", "TASKS", "Labelled", "Splits", "Task", "decode", "encode", "get_task", "offline_splits",
           "one_hot", "summarize"]

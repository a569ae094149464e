"""Tools for the device-contract tests: catching, on a CPU-only machine, the code that would break on a GPU.

- ``FactoryCalls``: a TorchFunctionMode that records every tensor factory (``torch.tensor``, ``zeros``,
  ``randn``, ...) called directly from braid_ray code without an explicit ``device=``. On a GPU worker such a
  tensor lands on the CPU: mixed with CUDA tensors it raises, and in an NCCL collective it fails. Module
  and object construction (any ``__init__`` on the braid_ray stack) is exempt: weights are built on the CPU
  and moved with ``.to(device)``, which the device tests check separately.
- ``RecordingCollectives``: stands in for a 2-rank process group and records the device of every tensor
  handed to a collective (NCCL reduces CUDA tensors only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parents[1] / "braid_ray")
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.randn, torch.rand, torch.randint,
             torch.randperm, torch.arange, torch.linspace, torch.eye, torch.as_tensor}


class FactoryCalls(TorchFunctionMode):
    """Records ``file:line factory`` for each device-less tensor factory called from a braid_ray frame."""

    def __init__(self):
        super().__init__()
        self.missing: list[str] = []
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            frame = sys._getframe(1)
            while frame is not None and "torch" in Path(frame.f_code.co_filename).parts:
                frame = frame.f_back  # skip torch's own wrappers to find the caller
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE) and not _constructing(frame):
                self.checked += 1
                if kwargs.get("device") is None:
                    where = f"{Path(frame.f_code.co_filename).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
                    self.missing.append(f"{where} torch.{func.__name__}")
        return func(*args, **kwargs)


def _constructing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__init__" and frame.f_code.co_filename.startswith(PACKAGE):
            return True
        frame = frame.f_back
    return False


class RecordingCollectives:
    """A 2-rank group whose collectives record each tensor's device and leave values as one rank would see
    them after averaging identical ranks (all_reduce sums: the value doubles, as with two equal ranks)."""

    def __init__(self, monkeypatch):
        self.devices: list[torch.device] = []
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(dist, "broadcast", self.record)

    def all_reduce(self, tensor: torch.Tensor, op=None, group=None, async_op: bool = False) -> None:
        self.devices.append(tensor.device)
        tensor.mul_(2)

    def record(self, tensor: torch.Tensor, *args, **kwargs) -> None:
        self.devices.append(tensor.device)

"""The fine-tuning methods, one table for both domains: name -> the penalty g_hat, the label in reports, domains.

A method differs from another only by the penalty its conservative reward subtracts (braid_ray.reward):
none (STRL), the bootstrap ensemble's minimum, the feature-space uncertainty bonus, or a lower confidence
bound. The baselines that do not fine-tune (the pretrained sampler, gradient ascent on r_hat) are reference
rows of the evaluation, not methods here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Penalty = Literal["none", "min", "bonus", "lcb"]
MethodName = Literal["strl", "braid_boot", "braid_bonus", "braid_lcb"]


@dataclass(frozen=True)
class Method:
    name: str
    penalty: Penalty  # how g_hat is computed (braid_ray.reward.conservative)
    label: str  # how reports, tables and plots name it
    domains: tuple[str, ...] = ("sequence", "image")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("strl", "none", "STRL"),
    Method("braid_boot", "min", "BRAID-Boot"),
    Method("braid_bonus", "bonus", "BRAID-Bonus"),
    Method("braid_lcb", "lcb", "BRAID-LCB"),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown fine-tuning method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


REFERENCES = {"pretrained": "Pretrained"}  # the reference sampler's label, beside the methods'


def label(name: str) -> str:
    """A method's (or the pretrained sampler's) report label; any other name is returned as given."""
    return METHODS[name].label if name in METHODS else REFERENCES.get(name, name)

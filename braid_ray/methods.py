"""The fine-tuning methods, one table for both domains: name -> the penalty g_hat, the label in reports, domains.

A method differs from another only by the penalty its conservative reward subtracts (braid_ray.reward):
none (STRL), the bootstrap ensemble's minimum, the feature-space uncertainty bonus, or a lower confidence
bound. The baselines that do not fine-tune (the pretrained sampler, gradient ascent on r_hat) are reference
rows of the evaluation, not methods here; the paper's steering baselines (DDOM, Offline Guidance, CFG) are rows of
the evaluation too, listed in BASELINES (``baselines.methods``; braid_ray/baselines/).
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


BaselineName = Literal["ddom", "guidance", "cfg"]


@dataclass(frozen=True)
class Baseline:
    """A steering baseline of the evaluation: no fine-tuning, sampled and scored beside the methods."""

    name: str
    label: str  # how reports, tables and plots name it
    kind: Literal["conditional", "guidance"]  # a conditional denoiser with CFG | classifier guidance on the pretrained
    data: Literal["d_off", "d", "reward"]  # what it learns from (docs/method.md, "Baselines")


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    # a conditional diffusion model trained from scratch on D_off's sequences and labels (Krishnamoorthy et al. 2023)
    Baseline("ddom", "DDOM", "conditional", "d_off"),
    # classifier guidance on the pretrained model by the reward ensemble trained on D_off
    Baseline("guidance", "Offline Guidance", "guidance", "reward"),
    # a conditional pretraining: every sequence of D (what pretraining sees), labelled where it is in D_off
    Baseline("cfg", "CFG", "conditional", "d"),
)}

REFERENCES = {"pretrained": "Pretrained"}  # the reference sampler's label, beside the methods'


def label(name: str) -> str:
    """A method's (a baseline's, or the pretrained sampler's) report label; any other name is returned as given."""
    if name in METHODS:
        return METHODS[name].label
    return BASELINES[name].label if name in BASELINES else REFERENCES.get(name, name)

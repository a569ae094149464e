"""One methods registry: every place that names methods reads it (config, reward penalties, reports)."""

from __future__ import annotations

import typing

from braid_ray.methods import METHODS, MethodName, Penalty, label
from braid_ray.reward.conservative import PENALTIES


def test_registry_matches_its_types_and_the_reward_penalties() -> None:
    assert set(typing.get_args(MethodName)) == set(METHODS)
    assert {m.penalty for m in METHODS.values()} == set(typing.get_args(Penalty))
    assert set(typing.get_args(Penalty)) == set(PENALTIES)


def test_labels() -> None:
    assert label("strl") == "STRL" and label("braid_boot") == "BRAID-Boot" and label("pretrained") == "Pretrained"
    assert label("Grad. (r_hat)") == "Grad. (r_hat)"

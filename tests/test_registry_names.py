"""The registry names config.py declares (so that validating a config imports no registry) are the registries' keys:
one test per registry, so a name added to one and not the other fails here, naming which."""

from __future__ import annotations

import typing

from braid_ray import config


def names(literal: object) -> set:
    return set(typing.get_args(literal))


def test_task_names_are_the_task_registry() -> None:
    from braid_ray.data.tasks import TASKS

    assert names(config.TaskName) == set(TASKS)


def test_oracle_names_are_the_oracle_registry() -> None:
    from braid_ray.oracles import ORACLES, SECONDARY

    assert names(config.OracleName) == set(ORACLES) == set(SECONDARY)
    assert {s for s in SECONDARY.values() if s is not None} <= set(ORACLES)


def test_method_names_are_the_method_table() -> None:
    from braid_ray.methods import METHODS, MethodName

    assert names(MethodName) == set(METHODS)


def test_baseline_names_are_the_baseline_table_and_every_kind_has_a_sampler() -> None:
    from braid_ray.baselines.rows import SAMPLERS
    from braid_ray.methods import BASELINES, BaselineName

    assert names(BaselineName) == set(BASELINES)
    assert {b.kind for b in BASELINES.values()} == set(SAMPLERS)


def test_backbone_names_are_the_backbone_registry() -> None:
    from braid_ray.diffusion.pretrain import BACKBONES

    assert names(config.BackboneName) == set(BACKBONES)


def test_prompt_set_names_are_the_prompt_sets() -> None:
    from braid_ray.images.prompts import PROMPT_SETS

    assert names(config.PromptSetName) == set(PROMPT_SETS)


def test_laion_head_names_are_the_bundled_heads() -> None:
    from braid_ray.images.aesthetic import LAION_HEADS

    assert names(config.LaionHeadName) == set(LAION_HEADS)


def test_zero_stages_are_the_stages_the_deepspeed_config_writes() -> None:
    from braid_ray.images.zero import ZERO_STAGES

    assert names(config.ZeroStage) == set(ZERO_STAGES)


def test_the_defaults_are_registered_names() -> None:
    cfg = config.Config()
    assert cfg.task.name in config.TASK_NAMES and cfg.diffusion.backbone in config.BACKBONE_NAMES
    assert cfg.image.prompts in config.PROMPT_SET_NAMES and cfg.image.oracle in config.LAION_HEAD_NAMES

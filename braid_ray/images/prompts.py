"""Named prompt sets: the fine-tuning prompt distribution is a config value (``image.prompts``)."""

from __future__ import annotations

import torch

# DDPO / AlignProp-style simple animal prompts: one common animal per prompt.
_ANIMALS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
            "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
            "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
            "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo")

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "simple_animals": _ANIMALS,
    "animal_photos": tuple(f"a photo of a {a}" for a in _ANIMALS),
    "tiny": ("a cat", "a dog", "a red bird", "a fish"),  # short prompts for the tiny CPU tokenizer
}


def prompt_set(name: str) -> tuple[str, ...]:
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; valid: {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]


def sample_prompts(name: str, n: int, generator: torch.Generator) -> list[str]:
    """n prompts drawn uniformly with replacement from the named set, from ``generator`` (reproducible)."""
    prompts = prompt_set(name)
    idx = torch.randint(len(prompts), (n,), generator=generator, device=generator.device)
    return [prompts[i] for i in idx.tolist()]

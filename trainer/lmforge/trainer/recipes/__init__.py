"""The recipe table: one straight-line recipe per method family.

Each family is a module with `run(config: RunConfig) -> dict` (the metrics it wrote to
metrics.json). Adding a method means adding a row here and, for a new family, one file.
Recipes are imported only when they run, so a pod loads just its own libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmforge.api.runconfig import RunConfig

# method family -> module with the recipe's `run(config)`
RECIPES = {
    "sft": "lmforge.trainer.recipes.sft",  # continued pretraining and SFT (FinetuneJob)
    "reward": "lmforge.trainer.recipes.reward",  # reward-model
    "preference": "lmforge.trainer.recipes.preference",  # dpo, ipo, orpo, simpo
    "kto": "lmforge.trainer.recipes.kto",
    "online": "lmforge.trainer.recipes.online",  # grpo, rloo (TRL)
    "ppo": "lmforge.trainer.recipes.ppo",  # our own (TRL removed PPO)
    "raft": "lmforge.trainer.recipes.raft",
}

# AlignmentJob method -> family (a FinetuneJob is always "sft")
METHOD_FAMILIES = {
    "reward-model": "reward",
    "dpo": "preference",
    "ipo": "preference",
    "orpo": "preference",
    "simpo": "preference",
    "kto": "kto",
    "grpo": "online",
    "rloo": "online",
    "ppo": "ppo",
    "raft": "raft",
}


class RecipeUnavailable(Exception):
    """The run asks for a method this trainer has no recipe for."""


def recipe_family(config: RunConfig) -> str:
    if config.kind == "FinetuneJob":
        return "sft"
    return METHOD_FAMILIES[config.spec.objective]


def run_recipe(config: RunConfig) -> dict[str, Any]:
    """Run the recipe of the config's method family; returns its metrics."""
    family = recipe_family(config)
    try:
        module = importlib.import_module(RECIPES[family])
    except ModuleNotFoundError as err:
        if err.name != RECIPES[family]:
            raise
        raise RecipeUnavailable(
            f"{config.kind} method {config.spec.objective} ({family} recipe) is not available "
            "in this trainer version"
        ) from None
    metrics: dict[str, Any] = module.run(config)
    return metrics

"""The recipe table covers every method the API accepts."""

from __future__ import annotations

import copy
from typing import get_args

from lmforge.trainer.recipes import METHOD_FAMILIES, RECIPES, recipe_family

from lmforge.api.kinds import AlignmentMethodType, TrainingJob
from lmforge.api.runconfig import resolve_run_config
from lmforge.api.validation import parse_object
from tests.catalogue import BASE


def test_every_alignment_method_has_a_family_with_a_recipe() -> None:
    assert set(METHOD_FAMILIES) == set(get_args(AlignmentMethodType))
    assert set(METHOD_FAMILIES.values()) | {"sft"} == set(RECIPES)


def test_finetune_jobs_run_the_sft_recipe_and_alignment_jobs_their_family() -> None:
    ftj, alj = (parse_object(copy.deepcopy(BASE[k])) for k in ("FinetuneJob", "AlignmentJob"))
    assert isinstance(ftj, TrainingJob) and isinstance(alj, TrainingJob)
    assert recipe_family(resolve_run_config(ftj, models={"model": "m"}, output="o")) == "sft"
    config = resolve_run_config(alj, models={"model": "m"}, output="o")
    assert recipe_family(config) == "preference"  # dpo


def test_our_own_online_recipes_have_their_own_families() -> None:
    # TRL runs grpo/rloo ("online"); raft and ppo are our own loops, one file each
    assert METHOD_FAMILIES["raft"] == "raft" and METHOD_FAMILIES["ppo"] == "ppo"
    assert RECIPES["ppo"] == "lmforge.trainer.recipes.ppo"
    assert RECIPES["raft"] == "lmforge.trainer.recipes.raft"

"""The output family of a recipe: which layout table and which config function build it."""

from __future__ import annotations

from collections.abc import Iterable

from workbench.build.layout import TensorSpec, mixtral_config, mixtral_plan
from workbench.build.shared_experts import deepseek_config, deepseek_plan, qwen_config, qwen_plan
from workbench.recipe import Recipe


def output_plan(recipe: Recipe, base_cfg: dict, tensor_names_of_base: Iterable[str]) -> list[TensorSpec]:
    """Every output tensor of the recipe's family, in file order."""
    experts = len(recipe.experts)
    if recipe.family == "qwen":
        return qwen_plan(base_cfg, experts, tensor_names_of_base)
    if recipe.family == "deepseek":
        return deepseek_plan(base_cfg, experts, tensor_names_of_base, bool(recipe.shared_experts))
    return mixtral_plan(base_cfg, experts, tensor_names_of_base)


def output_config(recipe: Recipe, base_cfg: dict, dtype: str) -> dict:
    """config.json of the recipe's family (before the transformers-4 fix-ups)."""
    make = {"qwen": qwen_config, "deepseek": deepseek_config}.get(recipe.family, mixtral_config)
    return make(base_cfg, recipe, dtype)

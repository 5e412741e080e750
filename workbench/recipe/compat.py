"""Compatibility of a recipe's models, read from their config.json before any weight.

Experts must match the base in family, hidden size, intermediate size, layer count, heads,
kv-heads, head_dim and activation; a different vocabulary is a loud warning (docs/reliability.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from workbench import timings
from workbench.recipe.families import FAMILY_LABELS, INPUT_TYPES
from workbench.recipe.schema import ConfigUnavailable, Problem, Recipe

# Config fields an expert must share with the base: its MLPs plug into the base's residual
# stream, layer by layer (mergekit drops extra layers silently and crashes on the rest).
MATCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act")
SET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # a shipped example set: assets/forge/NAME.jsonl


def forge_command_data(forge_data: str) -> str:
    """The DATA argument of the forge command for an expert's `forge_data`: a shipped set's
    name becomes its file under assets/forge (the command runs from the workbench's folder)."""
    return f"assets/forge/{forge_data}.jsonl" if SET_NAME.fullmatch(forge_data) else forge_data


def _model_paths(recipe: Recipe) -> dict[str, list[str]]:
    paths: dict[str, list[str]] = {recipe.base_model: ["base_model"]}
    for i, expert in enumerate(recipe.experts):
        paths.setdefault(expert.source_model, []).append(f"experts[{i}].source_model")
    for i, expert in enumerate(recipe.shared_experts or []):
        paths.setdefault(expert.source_model, []).append(f"shared_experts[{i}].source_model")
    return paths


def check_compatibility(recipe: Recipe, configs: Mapping[str, dict | ConfigUnavailable]) -> list[Problem]:
    out: list[Problem] = []
    paths = _model_paths(recipe)
    forged = {e.source_model: e.forge_data for e in recipe.experts if e.forge_data}
    for ref, where in paths.items():
        config = configs.get(ref)
        if isinstance(config, ConfigUnavailable) and ref in forged and config.level == "error":
            out.append(Problem("error", where[0], f"'{ref}' is not forged yet",
                               f"forge it from {forged[ref]!r} with one command, python -m workbench forge "
                               f"{recipe.base_model} {forge_command_data(forged[ref])} {ref} "
                               f"({timings.forge_each()}), or press 'Forge missing experts' in the "
                               "Design tab"))
        elif isinstance(config, ConfigUnavailable) and config.level == "warning":
            out.append(Problem(config.level, where[0], f"config of '{ref}' not reachable: {config.reason}",
                               "check the name, the network or HF_TOKEN; compatibility is unchecked"))
        elif isinstance(config, ConfigUnavailable):  # the reason says what is wrong and what to do
            out.append(Problem(config.level, where[0], f"cannot use '{ref}': {config.reason}", config.fix or
                               "fix what the message names; compatibility is checked once the model reads"))
    base = configs.get(recipe.base_model)
    if not isinstance(base, dict):
        return out
    family, label = INPUT_TYPES[recipe.family], FAMILY_LABELS[recipe.family]
    if base.get("model_type") not in family:
        out.append(Problem("error", "base_model",
                           f"model_type '{base.get('model_type')}' cannot become a {label} MoE",
                           f"use a {' or '.join(family)} model as the base"))
        return out
    if recipe.family != "mixtral" and _fact(base, "head_dim") * (base.get("num_attention_heads") or 0) \
            != base.get("hidden_size"):
        # vLLM's Qwen2-MoE and DeepSeek attention take head_dim = hidden / heads, whatever the config says.
        out.append(Problem("error", "base_model", f"head_dim {_fact(base, 'head_dim')} x "
                           f"{base.get('num_attention_heads')} heads is not hidden_size "
                           f"{base.get('hidden_size')}, which {label} readers assume",
                           "use architecture: mixtral for this base"))
    for ref, where in paths.items():
        config = configs.get(ref)
        if ref == recipe.base_model or not isinstance(config, dict):
            continue
        for found in _compare(base, config, ref, family, label):
            out += [Problem(found.level, w, found.message, found.fix) for w in where]
    return out


def _compare(base: dict, other: dict, ref: str, family: tuple[str, ...], label: str) -> list[Problem]:
    out = []
    kind = other.get("model_type")
    if kind not in family:
        need = " or ".join(family)
        return [Problem("error", "", f"'{ref}' is a {kind} model; a {label} merge needs {need}",
                        "pick an expert fine-tuned from the same base family")]
    for key in MATCH_FIELDS:
        want, got = _fact(base, key), _fact(other, key)
        if want != got:
            out.append(Problem("error", "", f"{key} is {got} in '{ref}' but {want} in the base",
                               "experts must be fine-tunes of the same architecture as the base"))
    if other.get("vocab_size") != base.get("vocab_size"):
        out.append(Problem("warning", "", f"vocab_size is {other.get('vocab_size')} in '{ref}' but "
                           f"{base.get('vocab_size')} in the base: the base tokenizer is used for all",
                           "prefer experts that share the base tokenizer"))
    return out


def _fact(config: dict, key: str) -> Any:
    """A config value with transformers' defaults filled in, so absent == default compares equal."""
    if key == "head_dim":
        value = config.get("head_dim")
        heads = config.get("num_attention_heads") or 1
        return value if value else (config.get("hidden_size") or 0) // heads
    if key == "num_key_value_heads":
        return config.get(key) or config.get("num_attention_heads")
    if key == "hidden_act":
        return config.get(key, "silu")
    return config.get(key)

"""Semantic validation of a parsed recipe: counts, prompts, expert settings, compatibility.

Returns every problem at once; compatibility facts arrive as plain config dicts (see
`workbench.models.read_configs`), so nothing here touches torch or a weight file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from workbench.recipe.compat import check_compatibility
from workbench.recipe.families import check_family
from workbench.recipe.refs import DEMO_PREFIX, ref_problems, split_ref
from workbench.recipe.schema import (
    MAX_EXPERTS,
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS_PER_SET,
    PROMPT_MEAN_MODES,
    PROMPTLESS_MODES,
    ConfigUnavailable,
    Problem,
    Recipe,
)


def validate(recipe: Recipe, configs: Mapping[str, dict | ConfigUnavailable] | None = None, *,
             allow_remote_code: bool = False) -> list[Problem]:
    """Every problem of a parsed recipe; with `configs` (ref -> config.json), compatibility too.
    `allow_remote_code` turns the refusal of a family that loads only through remote code
    (DeepSeek-MoE) into a warning."""
    problems = (_check_counts(recipe) + check_family(recipe, allow_remote_code=allow_remote_code)
                + _check_prompts(recipe) + _check_experts(recipe) + _check_names(recipe)
                + _check_text(recipe) + _check_refs(recipe))
    if configs is not None:
        problems += check_compatibility(recipe, configs)
    return problems


def _check_counts(recipe: Recipe) -> list[Problem]:
    out, n, k = [], len(recipe.experts), recipe.experts_per_token
    if k < 1:
        out.append(Problem("error", "experts_per_token", f"must be at least 1 (got {k})",
                           "use 2, the usual Mixtral setting"))
    elif n < k:
        out.append(Problem("error", "experts_per_token", f"is {k} but the recipe has only {n} experts",
                           f"add experts or lower experts_per_token to {n}"))
    if n > MAX_EXPERTS:
        out.append(Problem("error", "experts", f"has {n} experts; the limit is {MAX_EXPERTS}",
                           "remove experts"))
    elif n & (n - 1):
        out.append(Problem("warning", "experts", f"{n} experts is not a power of two",
                           "older llama.cpp builds refuse such models; 2, 4, 8 or 16 load everywhere"))
    return out


def _check_prompts(recipe: Recipe) -> list[Problem]:
    out: list[Problem] = []
    promptless = recipe.gate_mode in PROMPTLESS_MODES
    for i, shared in enumerate(recipe.shared_experts or []):
        for key in ("positive_prompts", "negative_prompts"):
            out += _check_prompt_list(getattr(shared, key), f"shared_experts[{i}].{key}")
    for i, expert in enumerate(recipe.experts):
        for key in ("positive_prompts", "negative_prompts", "probe_prompts"):
            out += _check_prompt_list(getattr(expert, key), f"experts[{i}].{key}")
        if promptless:
            if expert.positive_prompts or expert.negative_prompts:
                out.append(Problem("warning", f"experts[{i}]",
                                   f"prompts are ignored in gate_mode '{recipe.gate_mode}'",
                                   "use gate_mode 'hidden' to route by prompts"))
            continue
        if not expert.positive_prompts:
            out.append(Problem("error", f"experts[{i}].positive_prompts",
                               f"gate_mode '{recipe.gate_mode}' needs positive prompts for every expert",
                               "add a few prompts this expert should take, one per line "
                               "(or [\"\"] for zero positive prompting)"))
        elif not any(p.strip() for p in expert.positive_prompts):
            out.append(Problem("warning", f"experts[{i}].positive_prompts",
                               "all positive prompts are empty: the gate is the BOS state minus the "
                               "negatives (\"zero positive prompting\")",
                               "fine if intended; otherwise add prompts this expert should take"))
    for i, expert in enumerate(recipe.experts):
        if expert.forge_data is not None and not expert.forge_data.strip():
            out.append(Problem("error", f"experts[{i}].forge_data", "is empty",
                               "name a shipped example set (pirate, victorian, hero, villain) or a "
                               "JSON-lines file, or remove forge_data"))
        elif expert.forge_data and expert.source_model == recipe.base_model:
            out.append(Problem("warning", f"experts[{i}].forge_data", "is ignored: source_model is the base "
                               "itself, not a forged expert", "set source_model to the folder to forge into"))
    seen = {p for e in recipe.experts for p in (e.positive_prompts or []) + (e.negative_prompts or [])}
    for i, expert in enumerate(recipe.experts):
        for j, probe in enumerate(expert.probe_prompts or []):
            if probe in seen:
                out.append(Problem("warning", f"experts[{i}].probe_prompts[{j}]",
                                   "is also a positive or negative prompt, so the gates are made from it "
                                   "and it is not scored as held out", "write a text the gates never see"))
    if recipe.center_gates and recipe.gate_mode not in PROMPT_MEAN_MODES:
        out.append(Problem("warning", "center_gates", f"has no effect in gate_mode '{recipe.gate_mode}'",
                           f"centring applies to {', '.join(PROMPT_MEAN_MODES)}; remove center_gates"))
    elif recipe.center_gates and len(recipe.experts) < 2:
        out.append(Problem("warning", "center_gates", "with one expert, centring leaves a zero row",
                           "add experts or remove center_gates"))
    if not promptless and len(recipe.experts) > 1:
        sets = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in recipe.experts}
        if len(sets) == 1:
            out.append(Problem("error", "experts", "every expert has the same prompts, so every router "
                               "row is the same and routing is arbitrary",
                               "give each expert prompts of its own theme"))
    return out


def _check_prompt_list(prompts: list[str] | None, path: str) -> list[Problem]:
    if not prompts:
        return []
    out = []
    if len(prompts) > MAX_PROMPTS_PER_SET:
        out.append(Problem("error", path, f"has {len(prompts)} prompts; the limit is {MAX_PROMPTS_PER_SET}",
                           "keep the most typical prompts"))
    for j, prompt in enumerate(prompts):
        if len(prompt) > MAX_PROMPT_CHARS:
            out.append(Problem("error", f"{path}[{j}]",
                               f"is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}",
                               "a short typical prompt routes as well as a long one"))
    return out


def _check_experts(recipe: Recipe) -> list[Problem]:
    out = []
    if not recipe.base_model.strip():
        out.append(Problem("error", "base_model", "is empty", "name a hub id, a local folder or demo:NAME"))
    every = [(f"experts[{i}]", e) for i, e in enumerate(recipe.experts)]
    every += [(f"shared_experts[{i}]", e) for i, e in enumerate(recipe.shared_experts or [])]
    for path, expert in every:
        if not expert.source_model.strip():
            out.append(Problem("error", f"{path}.source_model", "is empty",
                               "name a hub id, a local folder or demo:NAME"))
        noise, residual = expert.noise_scale, expert.residual_scale
        for key, value in (("noise_scale", noise), ("residual_scale", residual)):
            if value is not None and not math.isfinite(value):
                out.append(Problem("error", f"{path}.{key}", f"must be a finite number (got {value})",
                                   "write a number such as 0.01"))
        if noise is not None and math.isfinite(noise) and noise < 0:
            out.append(Problem("error", f"{path}.noise_scale", f"must be >= 0 (got {noise})",
                               "write the standard deviation of the noise, e.g. 0.01"))
        if residual == 0:
            out.append(Problem("warning", f"{path}.residual_scale",
                               "is 0, so this expert's output is always zero", "remove it or use e.g. 0.5"))
    sources = {e.source_model for e in recipe.experts}
    if len(recipe.experts) > 1 and len(sources) == 1:
        out.append(Problem("warning", "experts", "every expert is the same model: outputs only differ "
                           "after training, but routing is still worth seeing",
                           "fine for demos; use different fine-tunes for a useful merge"))
    return out


def _check_refs(recipe: Recipe) -> list[Problem]:
    """The reference syntax mergekit refuses, and LoRAs where the workbench cannot apply them."""
    refs = [("base_model", recipe.base_model)] + [
        (f"{group}[{i}].source_model", e.source_model)
        for group in ("experts", "shared_experts") for i, e in enumerate(getattr(recipe, group) or [])]
    out = []
    for path, ref in refs:
        found = ref_problems(ref, path)
        out += found
        lora = split_ref(ref)[1]
        if found or lora is None:
            continue
        if path == "base_model":
            out.append(Problem("error", path, f"'{ref}' applies a LoRA to the base, whose attention, "
                               "embeddings and hidden states (the gates') the workbench reads unchanged",
                               "merge the adapter into the base first (peft: merge_and_unload, then "
                               "save_pretrained with safetensors) and name that folder"))
        elif lora.strip().startswith(DEMO_PREFIX):
            out.append(Problem("error", path, f"'{lora}' is a demo model, not a LoRA adapter",
                               "name the adapter's Hub repo or folder after the '+'"))
    return out


def _texts(recipe: Recipe) -> list[tuple[str, str]]:
    """(key path, text) of every string the recipe holds."""
    found = [("base_model", recipe.base_model)]
    for group in ("experts", "shared_experts"):
        for i, expert in enumerate(getattr(recipe, group) or []):
            found.append((f"{group}[{i}].source_model", expert.source_model))
            if expert.name:
                found.append((f"{group}[{i}].name", expert.name))
            for key in ("positive_prompts", "negative_prompts"):
                prompts = getattr(expert, key) or []
                found += [(f"{group}[{i}].{key}[{j}]", text) for j, text in enumerate(prompts)]
    return found


def _check_names(recipe: Recipe) -> list[Problem]:
    out = []
    for i, expert in enumerate(recipe.experts):
        name = expert.name
        if name is None:
            continue
        if not name.strip() or len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
            out.append(Problem("error", f"experts[{i}].name", f"is {name!r}; a name is 1 to {MAX_NAME_CHARS} "
                               "characters on one line", "write a short label such as 'code' or 'stories', "
                               "or leave it out"))
    names = [e.name.strip() for e in recipe.experts if e.name and e.name.strip()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        out.append(Problem("warning", "experts", f"the name(s) {', '.join(twice)} are used more than once",
                           "give each expert its own name, so that legends tell them apart"))
    return out


def _check_text(recipe: Recipe) -> list[Problem]:
    """Strings that cannot be written as UTF-8: YAML's "\\ud83e" escape makes half a character,
    which a build would only find when writing the recipe copy, after the weights."""
    out = []
    for path, text in _texts(recipe):
        lone = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
        if lone is not None:
            out.append(Problem("error", path, f"contains U+{ord(lone):04X}, half of a UTF-16 surrogate pair, "
                               "which is not a character", "write the character itself, or escape it "
                               "whole as \\U0001F916 (eight hex digits)"))
    return out

"""Recipes as YAML: load, dump, and the structural checks made on the way in.

A recipe that mergekit-moe (0.1.x) accepts loads here with the same meaning; where
mergekit silently ignores a typo or a bad value, we report it. Parsing never stops at the
first problem: it returns every `Problem` at once, each with a key path such as
`experts[2].positive_prompts`, what is wrong, and how to fix it.

This module touches no torch and no file but the YAML.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from workbench.recipe.refs import canonical_ref
from workbench.recipe.safe_yaml import YamlRefused, load_yaml
from workbench.recipe.schema import (
    ARCHITECTURES,
    DTYPE_HINTS,
    DTYPES,
    GATE_MODE_ALIASES,
    GATE_MODES,
    MAX_YAML_BYTES,
    PROMPT_TEMPLATES,
    Expert,
    Problem,
    Recipe,
    RecipeError,
    errors,
)

KNOWN_TOP_KEYS = tuple(Recipe.model_fields)
# Keys with a few named values: (the values, what leaving the key out means)
CHOICES = {"architecture": (ARCHITECTURES, "mixtral"), "prompt_template": (PROMPT_TEMPLATES, "plain")}
KNOWN_EXPERT_KEYS = tuple(Expert.model_fields)


def _closest(word: str, options: tuple[str, ...]) -> str | None:
    found = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
    return found[0] if found else None


def parse_recipe(text: str) -> tuple[Recipe | None, list[Problem]]:
    """Parse YAML text into a Recipe; return it (None when unusable) and every problem found.

    Only structural problems are found here; `validate()` adds the semantic rules.
    """
    if len(text.encode("utf-8")) > MAX_YAML_BYTES:
        return None, [Problem("error", "", f"recipe is larger than {MAX_YAML_BYTES // 1024} KB",
                              "shorten the prompts or split the design")]
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, YamlRefused):
            return None, [Problem("error", "", f"the YAML{where} {what}",
                                  "write the values out instead of nesting anchors and aliases")]
        return None, [Problem("error", "", f"YAML syntax error{where}: {what}",
                              "check indentation and quoting around that spot")]
    if not isinstance(data, dict):
        return None, [Problem("error", "", "a recipe must be a YAML mapping with base_model and experts",
                              "start from a preset, e.g. presets/demo.yaml")]
    problems: list[Problem] = []
    data = _normalise(data, problems)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += [_from_pydantic(err) for err in exc.errors()]
        return None, problems
    return recipe, problems


def _normalise(data: dict, problems: list[Problem]) -> dict:
    """Drop unknown keys (reporting them) and map accepted aliases to canonical values; a
    model reference in mergekit's dict form becomes its string form."""
    data = _known_keys(data, KNOWN_TOP_KEYS, "", problems)
    if "base_model" in data:
        data["base_model"] = canonical_ref(data["base_model"], "base_model", problems)
    for list_key in ("experts", "shared_experts"):
        items = data.get(list_key)
        if isinstance(items, list):
            data[list_key] = [
                _known_keys(item, KNOWN_EXPERT_KEYS, f"{list_key}[{i}]", problems)
                if isinstance(item, dict) else item
                for i, item in enumerate(items)
            ]
            for i, item in enumerate(data[list_key]):
                if isinstance(item, dict) and "source_model" in item:
                    where = f"{list_key}[{i}].source_model"
                    item["source_model"] = canonical_ref(item["source_model"], where, problems)
    mode = data.get("gate_mode")
    if isinstance(mode, str):
        data["gate_mode"] = GATE_MODE_ALIASES.get(mode, mode)
    architecture = data.get("architecture")
    if isinstance(architecture, str):  # mergekit matches it case-insensitively
        data["architecture"] = architecture.lower()
    dtype = data.get("dtype")
    if isinstance(dtype, str) and dtype.startswith("torch."):
        data["dtype"] = dtype[len("torch."):]
    return data


def _known_keys(mapping: dict, known: tuple[str, ...], where: str, problems: list[Problem]) -> dict:
    kept = {}
    for key, value in mapping.items():
        if key in known:
            kept[key] = value
            continue
        path = f"{where}.{key}" if where else str(key)
        guess = _closest(str(key), known)
        if guess:
            # A near-miss is almost surely a typo whose value mergekit would drop silently.
            problems.append(Problem("error", path, f"unknown key '{key}'", f"did you mean '{guess}'?"))
        else:
            problems.append(Problem("warning", path, f"unknown key '{key}' is ignored",
                                    f"remove it; known keys: {', '.join(known)}"))
    return kept


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _from_pydantic(err: dict) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "list["))))
    path, field, value = _path(loc), (loc[-1] if loc else ""), err.get("input")
    kind = err["type"]
    if kind == "missing":
        fixes = {"base_model": "name the model that donates attention and embeddings",
                 "experts": "add a list of experts, each with source_model",
                 "source_model": "name the model whose MLPs this expert uses"}
        return Problem("error", path, "is required", fixes.get(field, "add it"))
    if field == "gate_mode" and isinstance(value, str):
        guess = _closest(value, GATE_MODES)
        fix = f"did you mean '{guess}'?" if guess else f"use one of: {', '.join(GATE_MODES)}"
        return Problem("error", path, f"unknown gate_mode '{value}'", fix)
    if field == "dtype" and isinstance(value, str):
        hint = DTYPE_HINTS.get(value.lower())
        fix = f"write '{hint}'" if hint else f"use one of: {', '.join(DTYPES)}"
        return Problem("error", path, f"unknown dtype '{value}'", fix)
    if field in CHOICES and isinstance(value, str):
        choices, default = CHOICES[field]
        guess = _closest(value, choices)
        fix = f"did you mean '{guess}'?" if guess else \
            f"use one of {', '.join(choices)}, or leave it out ({default})"
        return Problem("error", path, f"unknown {field} '{value}'", fix)
    if kind == "too_short" and field == "experts":
        return Problem("error", path, "has no experts", "add at least one expert with a source_model")
    return Problem("error", path, f"{err['msg']} (got {value!r})"[:300], _type_fix(kind))


def _type_fix(kind: str) -> str:
    return {
        "int_parsing": "write a whole number", "int_from_float": "write a whole number",
        "float_parsing": "write a number", "string_type": "write text (quote it if needed)",
        "list_type": "write a YAML list, one '- item' per line",
        "model_type": "write a mapping of keys to values",
    }.get(kind, "see docs/recipe.md for the expected form")


def read_recipe(path: str) -> tuple[Recipe, list[Problem]]:
    """Load a recipe file; return it with its warnings, or raise RecipeError on any error."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise RecipeError([Problem("error", "", f"cannot read {path}: {exc.strerror}",
                                   "check the path")]) from exc
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise RecipeError([Problem("error", "", f"{path} is not UTF-8 text (byte 0x{byte:02x} at offset "
                                   f"{exc.start})", "save it as UTF-8")]) from exc
    except ValueError as exc:  # a NUL in the path
        raise RecipeError([Problem("error", "", f"cannot read {path!r}: {exc}", "check the path")]) from exc
    recipe, problems = parse_recipe(text)
    if recipe is None or errors(problems):
        raise RecipeError(problems)
    return recipe, problems


def load_recipe(path: str) -> Recipe:
    """Load a recipe file, raising RecipeError on any structural error."""
    return read_recipe(path)[0]


def dump_recipe(recipe: Recipe) -> str:
    """YAML text in mergekit-moe's key order; defaults left out, so `parse(dump(r)) == r`."""
    data = recipe.model_dump(exclude_none=True)
    data["experts"] = [e.model_dump(exclude_none=True) for e in recipe.experts]
    if recipe.shared_experts is not None:
        data["shared_experts"] = [e.model_dump(exclude_none=True) for e in recipe.shared_experts]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def recipe_from_dict(data: Mapping[str, Any]) -> tuple[Recipe | None, list[Problem]]:
    """The form editor's path in: same checks as YAML, without the text step."""
    problems: list[Problem] = []
    cleaned = _normalise(dict(data), problems)
    try:
        return Recipe.model_validate(cleaned), problems
    except ValidationError as exc:
        return None, problems + [_from_pydantic(err) for err in exc.errors()]

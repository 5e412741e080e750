"""Recipes: the schema of a frankenMoE design, YAML load/dump, and validation.

A recipe that mergekit-moe (0.1.x) accepts loads here with the same meaning; where
mergekit silently ignores a typo or a bad value, we report it. Validation never stops
at the first problem: it returns every `Problem` at once, each with a key path such as
`experts[2].positive_prompts`, what is wrong, and how to fix it.

This module touches no torch and no file but the YAML: compatibility facts arrive as
plain config dicts (see `workbench.sources.read_configs`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workbench.errors import WorkbenchError

GateMode = Literal["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random", "router_input"]
DType = Literal["bfloat16", "float16", "float32"]
Architecture = Literal["mixtral"]

GATE_MODES: tuple[str, ...] = GateMode.__args__
DTYPES: tuple[str, ...] = DType.__args__
# Modes whose gates do not come from prompts: prompts are optional there.
PROMPTLESS_MODES = ("random", "uniform_random")
GATE_MODE_ALIASES = {"hidden_last": "hidden"}
DTYPE_HINTS = {
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
    "float": "float32", "f16": "float16", "f32": "float32",
}
FUTURE_ARCHITECTURES = ("qwen", "deepseek")

# Caps that keep one recipe from exhausting the machine (RELIABILITY.md).
MAX_YAML_BYTES = 256 * 1024
MAX_EXPERTS = 64
MAX_PROMPTS_PER_SET = 64
MAX_PROMPT_CHARS = 4000


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: DType | None = None
    experts_per_token: int = 2
    architecture: Architecture | None = None
    shared_experts: list[Expert] | None = None

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first, in recipe order."""
        refs = [self.base_model] + [e.source_model for e in self.experts]
        return list(dict.fromkeys(refs))


Level = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    level: Level
    path: str  # key path: "experts[1].positive_prompts", "" for the whole recipe
    message: str  # what is wrong
    fix: str = ""  # how to fix it

    def __str__(self) -> str:
        where = self.path or "recipe"
        tail = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.level}: {where}: {self.message}.{tail}"

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "path": self.path, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class ConfigUnavailable:
    """A model's config.json could not be read; `level` says whether that blocks a build."""

    reason: str
    level: Level = "error"


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.level == "error"]


class RecipeError(WorkbenchError):
    """A recipe that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- YAML -------------------------------------------------------------------------------

KNOWN_TOP_KEYS = tuple(Recipe.model_fields)
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
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
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
    """Drop unknown keys (reporting them) and map accepted aliases to canonical values."""
    data = _known_keys(data, KNOWN_TOP_KEYS, "", problems)
    for list_key in ("experts", "shared_experts"):
        items = data.get(list_key)
        if isinstance(items, list):
            data[list_key] = [
                _known_keys(item, KNOWN_EXPERT_KEYS, f"{list_key}[{i}]", problems)
                if isinstance(item, dict) else item
                for i, item in enumerate(items)
            ]
    mode = data.get("gate_mode")
    if isinstance(mode, str):
        data["gate_mode"] = GATE_MODE_ALIASES.get(mode, mode)
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
    if field == "architecture" and isinstance(value, str):
        if value.lower() in FUTURE_ARCHITECTURES:
            return Problem("error", path, f"architecture '{value}' is not supported yet",
                           "use 'mixtral' or leave it out")
        return Problem("error", path, f"unknown architecture '{value}'", "use 'mixtral' or leave it out")
    if kind == "too_short" and field == "experts":
        return Problem("error", path, "has no experts", "add at least one expert with a source_model")
    return Problem("error", path, f"{err['msg']} (got {value!r})"[:300], _type_fix(kind))


def _type_fix(kind: str) -> str:
    return {
        "int_parsing": "write a whole number", "int_from_float": "write a whole number",
        "float_parsing": "write a number", "string_type": "write text (quote it if needed)",
        "list_type": "write a YAML list, one '- item' per line",
        "model_type": "write a mapping of keys to values",
    }.get(kind, "see RECIPE.md for the expected form")


def read_recipe(path: str) -> tuple[Recipe, list[Problem]]:
    """Load a recipe file; return it with its warnings, or raise RecipeError on any error."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise RecipeError([Problem("error", "", f"cannot read {path}: {exc.strerror}",
                                   "check the path")]) from exc
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


# --- Semantic validation -------------------------------------------------------------------



def validate(recipe: Recipe, configs: Mapping[str, dict | ConfigUnavailable] | None = None) -> list[Problem]:
    """Every problem of a parsed recipe; with `configs` (ref -> config.json), compatibility too."""
    problems = _check_counts(recipe) + _check_prompts(recipe) + _check_experts(recipe)
    if configs is not None:
        from workbench.compat import check_compatibility  # compat imports this module

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
    if recipe.shared_experts:
        out.append(Problem("error", "shared_experts", "Mixtral has no shared experts",
                           "remove shared_experts (they are for Qwen2-MoE / DeepSeek outputs)"))
    return out


def _check_prompts(recipe: Recipe) -> list[Problem]:
    out: list[Problem] = []
    promptless = recipe.gate_mode in PROMPTLESS_MODES
    for i, expert in enumerate(recipe.experts):
        for key in ("positive_prompts", "negative_prompts"):
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
    for i, expert in enumerate(recipe.experts):
        path = f"experts[{i}]"
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

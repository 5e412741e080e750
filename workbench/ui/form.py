"""The Design form's data: a recipe as form values and back, and where each problem shows.

Pure functions, no Gradio, so both directions are unit-tested. The form shows prompts
one per line; a prompt can itself contain a line break, so prompts are escaped the way
a YAML/JSON string would be: a newline is written `\\n`, a backslash `\\\\`, and the
empty prompt (mergekit's "zero positive prompting", `[""]`) is the line `""`. Blank
lines are ignored, so a user can space prompts out.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from workbench.recipe import Problem, Recipe, dump_recipe

EMPTY_PROMPT = '""'
TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "architecture", "prompt_template")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale",
               "name")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def encode_prompts(prompts: Sequence[str] | None) -> str:
    """A prompt list as textbox text, one prompt per line."""
    lines = []
    for prompt in prompts or ():
        if prompt == "":
            lines.append(EMPTY_PROMPT)
            continue
        line = prompt.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append('\\"\\"' if line == EMPTY_PROMPT else line)
    return "\n".join(lines)


def decode_prompts(text: str | None) -> list[str] | None:
    """Textbox text back to a prompt list; None when there is no prompt at all."""
    prompts = []
    for line in (text or "").split("\n"):
        if line.strip() == EMPTY_PROMPT:
            prompts.append("")
        elif line.strip():
            prompts.append(_ESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], line.rstrip("\r")))
    return prompts or None


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """A recipe as the plain dict the form and the session state hold (None values dropped)."""
    return recipe.model_dump(exclude_none=True)


def expert_fields(expert: dict[str, Any]) -> list[Any]:
    """One expert dict as the values of its card's fields, in EXPERT_KEYS order."""
    return [expert.get("source_model", ""), encode_prompts(expert.get("positive_prompts")),
            encode_prompts(expert.get("negative_prompts")), expert.get("noise_scale"),
            expert.get("residual_scale"), expert.get("name", "")]


def form_data(previous: dict[str, Any], top: Sequence[Any], cards: Sequence[Sequence[Any]],
              shared: Sequence[Sequence[Any]] | None = None) -> dict[str, Any]:
    """Form values to recipe data; keys the form does not show (center_gates, an expert's
    probe_prompts) are kept: the cards are drawn from `previous`, one per expert. `shared` are the
    shared experts' cards (None: the recipe's shared experts as they were)."""
    data = {k: v for k, v in previous.items() if k not in TOP_KEYS and k != "experts"}
    for key, value in zip(TOP_KEYS, top, strict=True):
        if key == "experts_per_token" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if key == "base_model":
            value = (value or "").strip()
        if value not in (None, ""):
            data[key] = value
    data["experts"] = _experts(previous.get("experts"), cards)
    if shared is not None:
        data.pop("shared_experts", None)
        if shared:
            data["shared_experts"] = _experts(previous.get("shared_experts"), shared)
    return _ordered(data)


def _experts(shown: Any, cards: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Cards' values as expert dicts, each keeping the keys its card does not show."""
    shown = shown if isinstance(shown, list) else []
    experts = []
    for i, values in enumerate(cards):
        hidden = {k: v for k, v in (shown[i] if i < len(shown) and isinstance(shown[i], dict) else {}).items()
                  if k not in EXPERT_KEYS}
        source, positive, negative, noise, residual, name = values
        expert = {"source_model": (source or "").strip(), "name": (name or "").strip() or None,
                  "positive_prompts": decode_prompts(positive), "negative_prompts": decode_prompts(negative),
                  "noise_scale": _scale(noise), "residual_scale": _scale(residual)}
        experts.append({k: v for k, v in expert.items() if v is not None} | hidden)
    return experts


def _scale(value: Any) -> Any:
    """A scale field: empty means unset; a number stays a number; other text goes on to
    validation, which reports it at the field's key path."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            return text
    return value


def _ordered(data: dict[str, Any]) -> dict[str, Any]:
    """mergekit-moe's key order, so the YAML reads the same as a hand-written recipe."""
    order = ("base_model", "gate_mode", "dtype", "experts_per_token", "architecture", "experts")
    return {**{k: data[k] for k in order if k in data}, **{k: v for k, v in data.items() if k not in order}}


def data_yaml(data: dict[str, Any], recipe: Recipe | None) -> str:
    """YAML for the editor: the canonical dump when the data is a recipe, else the raw data."""
    if recipe is not None:
        return dump_recipe(recipe)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


# ---- where problems show ----------------------------------------------------------------

_EXPERT_PATH = re.compile(r"^(experts|shared_experts)\[(\d+)\](?:\.(\w+))?")
SCALE_KEYS = ("noise_scale", "residual_scale")
GROUPS = ("experts", "shared_experts")  # the routed experts' cards, then the shared experts'


def slot_keys(expert_count: int, shared_count: int = 0) -> list[str]:
    """Every place in the form a problem can show, in a fixed order."""
    keys = ["base_model", "settings"]
    for group, count in zip(GROUPS, (expert_count, shared_count), strict=True):
        keys.append(group)
        for i in range(count):
            keys += [f"{group}[{i}]", f"{group}[{i}].source_model", f"{group}[{i}].positive_prompts",
                     f"{group}[{i}].negative_prompts", f"{group}[{i}].scales"]
    return keys


def slot_for(path: str, expert_count: int, shared_count: int = 0) -> str:
    """The form slot of a problem's key path, e.g. experts[1].positive_prompts[3] -> that textbox."""
    if path.startswith("base_model"):
        return "base_model"
    match = _EXPERT_PATH.match(path)
    if match is None:
        if path.split(".")[0] == "shared_experts":
            return "shared_experts"
        return "settings" if path.split(".")[0] in TOP_KEYS else "experts"
    group, index, key = match[1], int(match[2]), match[3]
    if index >= (expert_count if group == "experts" else shared_count):
        return group
    if key in SCALE_KEYS:
        return f"{group}[{index}].scales"
    if key in ("source_model", "positive_prompts", "negative_prompts"):
        return f"{group}[{index}].{key}"
    if key == "name":
        return f"{group}[{index}].source_model"  # the name sits beside the source model
    return f"{group}[{index}]"


def problems_html(problems: Iterable[Problem], *, show_path: bool = False) -> str:
    """Problems as small inline notes: errors red, warnings amber, each with its fix."""
    items = []
    for p in problems:
        where = f"<code>{html.escape(p.path or 'recipe')}</code> " if show_path else ""
        fix = f' <span class="wb-fix">{html.escape(p.fix)}</span>' if p.fix else ""
        icon = "✖" if p.level == "error" else "▲"
        items.append(f'<div class="wb-problem wb-{p.level}" role="alert">{icon} {where}'
                     f"{html.escape(p.message)}.{fix}</div>")
    return "".join(items)


def slot_html(problems: Sequence[Problem], expert_count: int, shared_count: int = 0) -> dict[str, str]:
    """HTML for every slot of `slot_keys(expert_count, shared_count)`; empty where nothing is wrong."""
    grouped: dict[str, list[Problem]] = {key: [] for key in slot_keys(expert_count, shared_count)}
    for problem in problems:
        grouped[slot_for(problem.path, expert_count, shared_count)].append(problem)
    return {key: problems_html(found) for key, found in grouped.items()}


def problem_from_dict(data: dict[str, str]) -> Problem:
    return Problem(data["level"], data["path"], data["message"], data.get("fix", ""))  # type: ignore[arg-type]

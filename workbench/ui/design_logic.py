"""The Design tab's handlers as plain functions: recipe text or form values in, what to show out.

The session holds a *draft*: {"data": recipe as a dict, "problems": [problem dicts]}.
The form and the YAML editor both edit it: form edits rewrite the YAML; YAML edits that
parse replace the data and re-render the form. Validation (with the models' config.json,
read through a cache) runs on every edit and its problems go next to their fields.
"""

from __future__ import annotations

import copy
import html
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.recipe import (
    ConfigUnavailable,
    Problem,
    Recipe,
    errors,
    parse_recipe,
    patch_yaml,
    recipe_from_dict,
    validate,
)
from workbench.ui import form, shared, sizes

BLANK = "blank"
BLANK_TEXT = """# A blank recipe: name a base model and give each expert a source model and prompts.
# gate_mode fitted routes by the prompts best (Preview tab: "Compare gate modes").
base_model: ""
gate_mode: fitted
experts_per_token: 2
experts:
  - source_model: ""
    positive_prompts: []
  - source_model: ""
    positive_prompts: []
"""
NEW_EXPERT = {"source_model": "", "positive_prompts": []}
# How long a check waits for a Hub config it has not read yet; past that it answers with a
# "being fetched" warning and the Design tab checks again when the fetch is done.
CONFIG_WAIT = 1.5
_revisions = itertools.count(1)


def next_revision() -> int:
    """A value the form's `revision` state has never had, so setting it always re-renders.

    Not `revision + 1`: two handlers started from the same revision (the page's load check
    and a first edit) would both write the same number, the state would not change, and
    the form would keep showing the old recipe.
    """
    return next(_revisions)


@dataclass
class Checked:
    data: dict[str, Any]
    recipe: Recipe | None
    problems: list[Problem] = field(default_factory=list)
    base_config: dict | str | None = None  # the base's config.json, or why it is unavailable
    pending: bool = False  # a Hub config is still being fetched: check again when it is in
    unchecked: list[str] = field(default_factory=list)  # models whose config could not be read

    @property
    def draft(self) -> dict[str, Any]:
        return {"data": self.data, "problems": [p.to_dict() for p in self.problems]}

    @property
    def yaml(self) -> str:
        return form.data_yaml(self.data, self.recipe)

    def yaml_in(self, text: str | None) -> str:
        """The user's YAML `text` with this data written in (comments and layout kept), or the
        canonical dump when `text` is not a YAML mapping."""
        return patch_yaml(text or "", self.data) or self.yaml

    @property
    def problems_html(self) -> str:
        return form.problems_html(self.problems, show_path=True)

    def slots(self) -> dict[str, str]:
        return form.slot_html(self.problems, len(self.data.get("experts") or []),
                              len(self.data.get("shared_experts") or []))

    def summary(self) -> str:
        return (status_line(self.recipe, self.problems, self.unchecked, pending=self.pending)
                + sizes.estimate_html(self.recipe, self.base_config))


def check(data: dict[str, Any], token: str | None, earlier: list[Problem] | None = None) -> Checked:
    """Validate recipe data: structure, rules, and compatibility from the models' configs."""
    recipe, problems = recipe_from_dict(data)
    problems = list(earlier or []) + [p for p in problems if p not in (earlier or [])]
    base_config: dict | str | None = None
    pending, unchecked = False, []
    if recipe is not None:
        refs = recipe.model_refs()
        configs = shared.configs.get(refs, token, wait=CONFIG_WAIT)
        pending = shared.configs.pending(refs, token)
        problems += validate(recipe, configs)
        found = configs.get(recipe.base_model)
        base_config = found if isinstance(found, dict) else getattr(found, "reason", None)
        unchecked = [ref for ref in refs if isinstance(configs.get(ref), ConfigUnavailable)
                     and configs[ref].level == "warning"]
    return Checked(data, recipe, problems, base_config, pending, unchecked)


FAMILY_CHOICES = (("Qwen2-MoE (+ gated shared expert)", "qwen"),
                  ("DeepSeek-MoE (remote code, CLI only)", "deepseek"))


def family_choices(value: Any) -> list[tuple[str, Any]]:
    """The Output family dropdown: one Mixtral entry, whether the recipe spells
    `architecture: mixtral` out or leaves it out; any other value keeps its own entry, so the
    field never shows what the recipe does not say (validation names an unknown one)."""
    mixtral = value if value in ("", None, "mixtral") else ""
    choices = [("Mixtral", mixtral), *FAMILY_CHOICES]
    if value not in [v for _, v in choices]:
        choices.append((str(value), value))
    return choices


def template_choices(value: Any) -> list[tuple[str, Any]]:
    """The "Prompts are" dropdown: plain text (mergekit's way, whether the recipe spells
    `prompt_template: plain` out or leaves it out) or chat messages; any other value keeps its
    own entry for validation to name."""
    plain = value if value in ("", None, "plain") else ""
    choices = [("plain text", plain), ("chat messages", "chat")]
    if value not in [v for _, v in choices]:
        choices.append((str(value), value))
    return choices


def expert_labels(data: dict[str, Any]) -> list[str]:
    """What each expert of recipe data is called when it has no name (the form's placeholder)."""
    recipe, _ = recipe_from_dict(data)
    if recipe is not None:
        return recipe.expert_labels()
    return [f"expert {i}" for i in range(len(data.get("experts") or []))]


def status_line(recipe: Recipe | None, problems: list[Problem], unchecked: list[str] | None = None, *,
                pending: bool = False) -> str:
    """One line over the sizes: ready (every model's config read and checked), or what stands in
    the way: errors, or configs not read yet or not reachable."""
    bad, warn = len(errors(problems)), len(problems) - len(errors(problems))
    warned = f" · {warn} warning(s)" if warn else ""
    if recipe is None or bad:
        return (f'<div class="wb-status-line wb-status-bad">✖ {bad} error(s) to fix before preview or '
                f"build{warned}</div>")
    if pending:
        return ('<div class="wb-status-line wb-status-wait">… Checking: a model\'s config.json is being '
                f"fetched; the check finishes by itself{warned}</div>")
    if unchecked:
        names = ", ".join(f"<code>{html.escape(ref)}</code>" for ref in unchecked)
        return (f'<div class="wb-status-line wb-status-bad">✖ Not checked: the config.json of {names} cannot '
                "be read (offline, a typo, or a gated model without HF_TOKEN), so the build would fail; see "
                f"the warning below{warned}</div>")
    mode = html.escape(recipe.gate_mode)
    return (f'<div class="wb-status-line wb-status-ok">✔ Ready: {len(recipe.experts)} experts, '
            f"top-{recipe.experts_per_token}, gate mode <code>{mode}</code>{warned}</div>")


def preset_names() -> list[str]:
    names = sorted(p.stem for p in shared.PRESETS.glob("*.yaml"))
    return (["demo"] if "demo" in names else []) + [n for n in names if n != "demo"] + [BLANK]


def preset_text(name: str) -> str:
    if name == BLANK:
        return BLANK_TEXT
    path = shared.PRESETS / f"{Path(name).name}.yaml"  # a name, never a path from the browser
    if not path.is_file():
        raise FileNotFoundError(f"no preset named {name!r}")
    return path.read_text(encoding="utf-8")


def preset_description(text: str) -> str:
    """The preset's leading comment block, as one paragraph."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def from_yaml(text: str, token: str | None) -> tuple[Checked | None, list[Problem]]:
    """Parse editor text; (None, problems) when it does not parse into a recipe."""
    recipe, problems = parse_recipe(text or "")
    if recipe is None:
        return None, problems
    return check(form.recipe_data(recipe), token, earlier=problems), problems


def fetching(text: str, token: str | None) -> bool:
    """Whether a model config of the recipe in `text` is still being fetched (no check runs)."""
    recipe, _ = parse_recipe(text or "")
    return recipe is not None and shared.configs.pending(recipe.model_refs(), token)


def from_form(draft: dict[str, Any], top: list[Any], cards: list[list[Any]], token: str | None,
              shared: list[list[Any]] | None = None) -> Checked:
    return check(form.form_data(draft["data"], top, cards, shared), token)


def restructure(draft: dict[str, Any], action: str, index: int, token: str | None) -> Checked:
    """Add, remove, duplicate or move an expert card; add or remove the shared expert's."""
    data = copy.deepcopy(draft["data"])
    if action in ("add-shared", "remove-shared"):
        return check(_shared_changed(data, action, index), token)
    experts = data.setdefault("experts", [])
    if action == "add":  # a new expert starts from the base model: one thing left to fill in
        experts.append({**NEW_EXPERT, "source_model": data.get("base_model") or ""})
    elif not 0 <= index < len(experts):
        raise IndexError(f"no expert {index}")
    elif action == "remove":
        experts.pop(index)
    elif action == "duplicate":
        experts.insert(index + 1, copy.deepcopy(experts[index]))
    elif action in ("up", "down"):
        other = index - 1 if action == "up" else index + 1
        if 0 <= other < len(experts):
            experts[index], experts[other] = experts[other], experts[index]
    else:
        raise ValueError(f"unknown action {action!r}")
    return check(data, token)


def _shared_changed(data: dict[str, Any], action: str, index: int) -> dict[str, Any]:
    """The recipe data with a shared expert added (the base model, prompts for Qwen2-MoE's gate
    only) or removed; no shared expert left removes the key."""
    shared = data.setdefault("shared_experts", [])
    if action == "add-shared":
        prompts = {} if data.get("architecture") == "deepseek" else {"positive_prompts": []}
        shared.append({"source_model": data.get("base_model") or "", **prompts})
    elif 0 <= index < len(shared):
        shared.pop(index)
    else:
        raise IndexError(f"no shared expert {index}")
    if not shared:
        data.pop("shared_experts")
    return data


def initial(token: str | None = None, *, with_configs: bool = False) -> tuple[str, Checked]:
    """The embedded default (the demo preset): its text and its checked draft.

    At app creation the models' configs are not read (the demo model may still need
    dequantising); the page's load event re-checks with them.
    """
    text = preset_text(preset_names()[0])
    if with_configs:
        checked, _ = from_yaml(text, token)
        return text, checked
    recipe, problems = parse_recipe(text)
    return text, Checked(form.recipe_data(recipe), recipe, problems + validate(recipe))

"""The Preview tab's work as plain functions: gates from the recipe, routing of a probe text, no build.

Gates and their held-out score depend only on the recipe (and the base model's device), not
on the probe text, so they are kept in a small cache keyed by exactly what they depend on:
editing the probe text re-routes in well under a second; editing a prompt recomputes the
gates (a few forwards of the base model). The base model itself lives in the engine's registry.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from workbench.progress import CancelToken
from workbench.recipe import Problem, Recipe, RecipeError, errors, parse_recipe, validate
from workbench.ui import shared

CACHE_SIZE = 8
EXACT_NOTE = ("Every expert is a copy of the base model, so this preview is exactly the routing the "
              "built MoE will have, at every layer.")
ESTIMATE_NOTE = ("Layer 0 is exact; **deeper layers are an estimate**: these experts differ from the base, "
                 "and in the built MoE each layer's input carries the experts' outputs, not the base "
                 "model's. Build it and use the Routing tab for the real thing.")


@dataclass
class Preview:
    recipe: Recipe
    trace: Any  # RouterTrace of the probe text, source "preview"
    gates: Any  # Gates (L, E, H) with diagnostics
    exact: bool  # experts are all the base model: the preview equals the built routing
    seconds: float  # this call, gates included when they were not cached

    @property
    def names(self) -> list[str]:
        return self.recipe.expert_labels()

    @property
    def note(self) -> str:
        return EXACT_NOTE if self.exact else ESTIMATE_NOTE

    def summary(self) -> str:
        how = " as a chat message (the base's chat template around it: `prompt_template: chat`)" \
            if self.recipe.chats else ""
        return f"{self.trace.num_tokens} probe tokens routed{how} in {self.seconds:.2f} s"


def score_summary(score: Any, advice: list[str]) -> str:
    """The held-out score in a line, each number next to chance and perfect, then what it means."""
    if score.top1 is None:
        head = "**Held-out routing: nothing to score.**"
    else:
        top_k = "" if score.k == 1 else (f" · **top-{score.k} {score.topk:.2f}** "
                                         f"(chance {score.chance_topk:.2f})")
        head = (f"**Held-out top-1 {score.top1:.2f}** (chance {score.chance_top1:.2f}, perfect 1){top_k}: "
                f"how often a theme's held-out tokens go to its own expert ({score.held_out}).")
    return "\n".join([head, *(f"- {line}" for line in advice)])


def compare_table(results: list[Any], recipe: Recipe) -> str:
    """The comparison as a markdown table, best first, the recipe's own mode marked, then what
    the recipe's own mode's score means."""
    from workbench.gates import explain

    first = results[0].score
    own = (recipe.gate_mode, bool(recipe.center_gates))
    lines = [f"Held out: {first.held_out}. Chance: top-1 {first.chance_top1:.2f}, top-{first.k} "
             f"{first.chance_topk:.2f}; perfect 1. Time: this mode's gates for the whole recipe.\n",
             f"| gate mode | top-1 | top-{first.k} | seconds |", "|---|---|---|---|"]
    for r in results:
        mark = " (recipe)" if (r.mode, r.center) == own else ""
        top1 = "-" if r.score.top1 is None else f"{r.score.top1:.2f}"
        topk = "-" if r.score.topk is None else f"{r.score.topk:.2f}"
        lines.append(f"| {r.label}{mark} | {top1} | {topk} | {r.seconds:.2f} |")
    current = next((r for r in results if (r.mode, r.center) == own), None)
    if current is not None:
        advice = explain(current.score, current.gates.diagnostics, recipe.expert_labels())
        if advice:
            lines += [f"\nThe recipe's mode, {current.label}:"] + [f"- {line}" for line in advice]
    return "\n".join(lines)


def with_mode(yaml_text: str, mode: str, center: bool) -> str:
    """The recipe text with `gate_mode` (and `center_gates`) set, the rest as the user wrote it."""
    from workbench.recipe import load_yaml, patch_yaml

    unreadable = RecipeError([Problem("error", "", "the recipe YAML is not a mapping of keys",
                                      "fix it in the Design tab, then use the mode again")])
    data = load_yaml(yaml_text)
    if not isinstance(data, dict):
        raise unreadable
    data["gate_mode"] = mode
    if center:
        data["center_gates"] = True
    else:
        data.pop("center_gates", None)
    patched = patch_yaml(yaml_text, data)
    if patched is None:
        raise unreadable
    return patched


class _Cache:
    """A few recent results keyed by what they depend on (least recently used goes first).

    A key being made is made once: a second caller (a reply sent while the Chat tab computes
    a recipe's routers ahead) waits for it instead of making it again; if the first one
    fails, the waiter makes it itself (and meets its own error)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()
        self._making: dict[str, threading.Event] = {}

    def get(self, key: str, make: Any) -> Any:
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                making = self._making.get(key)
                if making is None:
                    making = self._making[key] = threading.Event()
                    break
            making.wait()
        try:
            value = make()
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return value
        finally:
            with self._lock:
                self._making.pop(key).set()

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._items


_gates, _scores, _comparisons = _Cache(), _Cache(), _Cache(2)


def recipe_for_preview(yaml_text: str) -> Recipe:
    recipe, problems = parse_recipe(yaml_text or "")
    problems = problems + (validate(recipe) if recipe is not None else [])
    if recipe is None or errors(problems):
        raise RecipeError(errors(problems) or problems)
    return recipe


def cache_key(recipe: Recipe, entry: Any) -> str:
    """What gates and their score depend on: base, mode, centring, top-k, the prompts (probes too)
    and how they are rendered; and the base's device/dtype."""
    facts = {"base": recipe.base_model, "mode": recipe.gate_mode, "center": bool(recipe.center_gates),
             "k": recipe.experts_per_token, "chat": recipe.chats,
             "experts": [[e.positive_prompts, e.negative_prompts, e.probe_prompts] for e in recipe.experts],
             "where": f"{entry.device}/{entry.dtype}"}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def gates_for(recipe: Recipe, entry: Any, cancel: CancelToken | None = None) -> Any:
    from workbench.gates import compute_gates

    def make() -> Any:
        with entry.lock:  # one forward at a time in this process (the engine's rule)
            return compute_gates(recipe, entry.path, model=entry.model, tokenizer=entry.tokenizer, seed=0,
                                 cancel=cancel)

    return _gates.get(cache_key(recipe, entry), make)


def base_entry(recipe: Recipe, *, token: str | None, device: str) -> Any:
    from workbench.chat import registry

    shared.check_model_ref(recipe.base_model, "base_model")
    return registry().get(recipe.base_model, device=device, token=token)


def run_preview(yaml_text: str, text: str, *, token: str | None = None, device: str = "auto",
                cancel: CancelToken | None = None) -> Preview:
    """Route `text` the way the recipe's MoE would, from the base model alone; `cancel` stops
    the gates between prompt sets (a preview whose client left)."""
    from workbench.routing import preview_routing

    started = time.perf_counter()
    recipe = recipe_for_preview(yaml_text)
    entry = base_entry(recipe, token=token, device=device)
    gates = gates_for(recipe, entry, cancel)
    names = recipe.expert_labels()
    trace = preview_routing(gates, entry, text, recipe.experts_per_token, expert_names=names,
                            chat=recipe.chats)
    return Preview(recipe, trace, gates, recipe.experts_copy_the_base(), time.perf_counter() - started)


def run_score(yaml_text: str, *, token: str | None = None, device: str = "auto",
              cancel: CancelToken | None = None) -> tuple[Recipe, Any, list[str]]:
    """The recipe's gates scored on held-out prompts: (recipe, HeldOutScore, advice)."""
    from workbench.gates import explain, score_recipe

    recipe = recipe_for_preview(yaml_text)
    if not all(e.positive_prompts for e in recipe.experts):
        raise RecipeError([Problem("error", "experts", f"gate_mode '{recipe.gate_mode}' has no prompts to "
                                   "score the routing on", "add positive prompts to every expert")])
    entry = base_entry(recipe, token=token, device=device)
    gates = gates_for(recipe, entry, cancel)

    def make() -> Any:
        with entry.lock:
            return score_recipe(recipe, entry.path, gates, model=entry.model, tokenizer=entry.tokenizer,
                                cancel=cancel)

    score = _scores.get(cache_key(recipe, entry), make)
    return recipe, score, explain(score, gates.diagnostics, recipe.expert_labels())


def run_compare(yaml_text: str, *, token: str | None = None, device: str = "auto",
                cancel: CancelToken | None = None) -> tuple[Recipe, list[Any]]:
    """Every gate mode scored side by side on the recipe's held-out prompts, best first."""
    from workbench.gates import compare_modes

    recipe = recipe_for_preview(yaml_text)
    entry = base_entry(recipe, token=token, device=device)

    def make() -> Any:
        with entry.lock:
            return compare_modes(recipe, entry.path, model=entry.model, tokenizer=entry.tokenizer,
                                 cancel=cancel)

    # Every mode is compared, so the recipe's own mode is not part of the key.
    key = cache_key(recipe.model_copy(update={"gate_mode": "hidden", "center_gates": None}), entry)
    return recipe, _comparisons.get(key, make)


def probe_examples() -> list[str]:
    lines = shared.read_asset("probe_texts.txt").splitlines()
    return [line.replace("\\n", "\n") for line in lines if line.strip() and not line.startswith("#")]

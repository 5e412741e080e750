"""The Preview tab's work as plain functions: gates from the recipe, routing of a probe text, no build.

Gates and the prompt alignment depend only on the recipe (and the base model's device), not
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
from workbench.recipe import Recipe, RecipeError, errors, parse_recipe, validate
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
        return f"{self.trace.num_tokens} probe tokens routed in {self.seconds:.2f} s"


def alignment_summary(aligned: Any) -> str:
    return (f"**Alignment {aligned.score:.2f}** (chance {aligned.chance:.2f}): the share of each expert's "
            "own prompt tokens that its router row wins, averaged over layers")


class _Cache:
    """A few recent results keyed by what they depend on (least recently used goes first)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: str, make: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


_gates, _alignments = _Cache(), _Cache()


def recipe_for_preview(yaml_text: str) -> Recipe:
    recipe, problems = parse_recipe(yaml_text or "")
    problems = problems + (validate(recipe) if recipe is not None else [])
    if recipe is None or errors(problems):
        raise RecipeError(errors(problems) or problems)
    return recipe


def cache_key(recipe: Recipe, entry: Any) -> str:
    """What gates and alignment depend on: base, mode, top-k, prompts; and the base's device/dtype."""
    facts = {"base": recipe.base_model, "mode": recipe.gate_mode, "k": recipe.experts_per_token,
             "experts": [[e.positive_prompts, e.negative_prompts] for e in recipe.experts],
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
    trace = preview_routing(gates, entry, text, recipe.experts_per_token, expert_names=names)
    return Preview(recipe, trace, gates, recipe.experts_copy_the_base(), time.perf_counter() - started)


def run_alignment(yaml_text: str, *, token: str | None = None, device: str = "auto",
                  cancel: CancelToken | None = None) -> tuple[Recipe, Any]:
    """The recipe's prompt-to-expert alignment: its own positive prompts routed by its gates."""
    from workbench.routing import alignment, alignment_traces

    recipe = recipe_for_preview(yaml_text)
    entry = base_entry(recipe, token=token, device=device)
    gates = gates_for(recipe, entry, cancel)
    key = cache_key(recipe, entry)
    return recipe, _alignments.get(key, lambda: alignment(alignment_traces(recipe, entry, gates=gates,
                                                                           cancel=cancel)))


def probe_examples() -> list[str]:
    lines = shared.read_asset("probe_texts.txt").splitlines()
    return [line.replace("\\n", "\n") for line in lines if line.strip() and not line.startswith("#")]

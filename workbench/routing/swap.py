"""New routers on a loaded MoE without a rebuild: a recipe's gates as the build would write them.

A build casts each layer's (E, H) gate rows to the output dtype and the loaded MoE reads
them back in its own dtype; `recipe_routers` does the same two casts, so a MoE steered with
them (`Intervention.with_routers`) routes exactly as the MoE built from that recipe would,
while the checkpoint and the loaded weights stay as they were. Only routers can be swapped:
`swap_notes` says what else differs between the recipe and the one the MoE was built from
(experts, noise, residual scales need a build).

Legend: L layers, E experts, H hidden.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.build import output_dtype
from workbench.recipe import Recipe, routed_experts
from workbench.routing.steer import InterventionError


def base_config(base_path: Path | None) -> dict[str, Any]:
    """The base model's config.json as a dict ({} when unreadable: the build's default dtype then)."""
    try:
        return json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8")) if base_path else {}
    except (OSError, ValueError):
        return {}


def recipe_routers(recipe: Recipe, gates: Any, moe: Any, *, base_path: Path | None = None) -> Tensor:
    """(L, E, H) router weights for the loaded MoE `moe` (a LoadedModel) from `gates` (the
    recipe's `Gates`), rounded through the dtype a build of `recipe` writes."""
    vectors = gates.vectors
    config = moe.model.config
    want = (int(config.num_hidden_layers), routed_experts(config), int(config.hidden_size))
    if tuple(vectors.shape) != want:
        raise InterventionError(f"the recipe's gates are {tuple(vectors.shape)} (layers, experts, hidden) "
                                f"but the MoE {moe.ref} needs {want}: use a recipe with {want[1]} experts "
                                "on the same base model")
    if not bool(torch.isfinite(vectors).all()):
        raise InterventionError("the recipe's gates contain NaN or infinity; check its prompts")
    written = getattr(torch, output_dtype(None, recipe, base_config(base_path)))
    return vectors.detach().to("cpu", written)


def swap_notes(recipe: Recipe, saved: Recipe | None) -> list[str]:
    """What the swapped-in routers do not bring over from `recipe`, compared with `saved` (the
    recipe the MoE was built from; None when it has no recipe copy)."""
    if saved is None:
        return ["this MoE has no recipe copy, so its experts cannot be compared with the recipe's"]
    notes = []
    if recipe.base_model != saved.base_model:
        notes.append(f"the recipe's base is {recipe.base_model}, the MoE's {saved.base_model}")
    if len(recipe.experts) != len(saved.experts):
        return notes + [f"the recipe has {len(recipe.experts)} experts, the MoE {len(saved.experts)}"]
    for e, (new, old) in enumerate(zip(recipe.experts, saved.experts, strict=True)):
        fields = [name for name in ("source_model", "noise_scale", "residual_scale")
                  if getattr(new, name) != getattr(old, name)]
        if fields:
            notes.append(f"expert {e}: {', '.join(fields)} differ from the build (only routers are "
                         "swapped; build to change the experts)")
    return notes

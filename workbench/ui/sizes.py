"""Sizes before a build: parameters (total and active per token), disk and memory.

Arithmetic on the base config.json only, with the tensor shapes of `workbench.build.layout`
(the same table the writer uses). Dimensions: L layers, E experts, k experts per token,
H hidden, I intermediate (MLP), V vocabulary.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from workbench.build import Dims, ties_embeddings
from workbench.errors import BuildError
from workbench.recipe import Recipe

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Estimate:
    total_params: int
    active_params: int  # per token: everything but the experts, plus k experts' MLPs
    expert_params: int  # one expert's MLPs over all layers
    disk_bytes: int
    dtype: str
    cpu_bytes: int  # weights in float32, the CPU compute dtype
    gpu_bytes: int  # weights in bfloat16, the GPU compute dtype


def estimate(recipe: Recipe, base_config: dict) -> Estimate:
    """Sizes of the MoE this recipe builds (its output family) from a base with `base_config`.
    A shared expert (Qwen2-MoE, DeepSeek-MoE) runs on every token, so it counts as active.

    Raises BuildError when the config lacks a dimension.
    """
    d = Dims.of(base_config)
    experts, k = len(recipe.experts), max(1, min(recipe.experts_per_token, len(recipe.experts)))
    attention = d.q * d.H + 2 * d.kv * d.H + d.H * d.q  # q, k, v, o
    per_layer = attention + 2 * d.H + experts * d.H  # + two norms + the router (E, H)
    mlp = 3 * d.H * d.I  # w1, w2, w3 of one expert in one layer
    qwen = recipe.family == "qwen"
    if qwen:  # the shared expert's gate row and the zero q/k/v biases
        per_layer += d.H + d.q + 2 * d.kv
    per_layer += mlp * (len(recipe.shared_experts or []) if recipe.family != "mixtral" else 0)
    tied = ties_embeddings(base_config) and not qwen  # a Qwen2-MoE writes its head out
    shared = d.V * d.H * (1 if tied else 2) + d.H  # embed (+ head) + final norm
    dense = shared + d.L * per_layer
    total = dense + d.L * experts * mlp
    active = dense + d.L * k * mlp
    dtype = _dtype(recipe, base_config)
    return Estimate(total, active, d.L * mlp, total * BYTES[dtype], dtype, total * 4, total * 2)


def _dtype(recipe: Recipe, base_config: dict) -> str:
    """The dtype the build writes: the recipe's, else the base config's, else float32."""
    if recipe.dtype:
        return recipe.dtype
    found = str(base_config.get("dtype") or base_config.get("torch_dtype") or "").removeprefix("torch.")
    return found if found in BYTES else "float32"


def human(count: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'; bytes with unit='B' -> '1.23 GB' (decimal units, as disks are sold)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f} {prefix}{unit}"
    return f"{count:.0f} {unit}".rstrip()


def estimate_html(recipe: Recipe | None, base_config: dict | str | None) -> str:
    """The Design tab's size tiles; says why when they cannot be computed yet."""
    if recipe is None:
        return _note("Sizes appear once the recipe parses.")
    if not isinstance(base_config, dict):
        why = f": {base_config}" if isinstance(base_config, str) else ""
        return _note(f"Sizes need the base model's config.json{why}")
    try:
        e = estimate(recipe, base_config)
    except BuildError as exc:
        return _note(f"Cannot size this model: {exc}")
    k = min(recipe.experts_per_token, len(recipe.experts))
    tiles = [
        ("Parameters", human(e.total_params), f"{len(recipe.experts)} experts × {human(e.expert_params)}"),
        ("Active per token", human(e.active_params),
         f"{e.active_params / e.total_params:.0%}: shared layers + {k} experts"),
        ("On disk", human(e.disk_bytes, "B"), f"{e.dtype}; the build streams, RAM stays small"),
        ("Memory to chat", human(e.cpu_bytes * 1.1, "B"),
         f"CPU float32; GPU bf16 ≈ {human(e.gpu_bytes * 1.1, 'B')}"),
    ]
    return '<div class="wb-stats">' + "".join(
        f'<div class="wb-stat"><div class="wb-stat-label">{html.escape(label)}</div>'
        f'<div class="wb-stat-value">{html.escape(value)}</div>'
        f'<div class="wb-stat-note">{html.escape(note)}</div></div>'
        for label, value, note in tiles) + "</div>"


def _note(text: str) -> str:
    return f'<div class="wb-muted">{html.escape(text)}.</div>'

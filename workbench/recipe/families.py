"""Output families and what each asks of a recipe, with mergekit-moe 0.1.5's meaning.

- `mixtral` (MixtralForCausalLM): routed experts only.
- `qwen` (Qwen2MoeForCausalLM): exactly one shared expert, always run, its output scaled by
  sigmoid(shared_expert_gate · x); that gate row is made from the shared expert's prompts like
  a routed expert's row (mergekit: "Qwen MoE requires the shared expert to have prompts").
- `deepseek` (DeepseekForCausalLM, DeepSeek-MoE v1): at most one shared expert, always run and
  never gated, so it takes no prompts. transformers (4 and 5) has no class for it: loading it
  runs deepseek-ai's modeling file (`trust_remote_code`), which the workbench never does, so it
  is refused unless the caller allows a remote-code output.

Pure facts over the recipe; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workbench.recipe.schema import PROMPTLESS_MODES, Problem, Recipe

FAMILY_LABELS = {"mixtral": "Mixtral", "qwen": "Qwen2-MoE", "deepseek": "DeepSeek-MoE"}
# Input model_types each family is built from (mergekit: llama or mistral; Qwen2-MoE also
# takes qwen2 bases in mergekit, whose attention biases the workbench does not copy yet).
INPUT_TYPES = {family: ("llama", "mistral") for family in FAMILY_LABELS}
# The config key that counts a family's routed experts (Mixtral, Qwen2-MoE, DeepSeek-MoE).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def routed_experts(config: Mapping[str, Any] | Any) -> int:
    """How many routed experts a model config (a config.json dict or a transformers config)
    declares; 0 for a dense model."""
    def read(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    return int(next((n for n in map(read, EXPERT_COUNT_KEYS) if n), 0) or 0)


def check_family(recipe: Recipe, *, allow_remote_code: bool = False) -> list[Problem]:
    """What the output family asks of shared experts, and what its readers need."""
    family, shared = recipe.family, recipe.shared_experts or []
    out: list[Problem] = []
    if family == "mixtral" and shared:
        out.append(Problem("error", "shared_experts", "Mixtral has no shared experts",
                           "remove shared_experts, or set architecture: qwen (one gated shared expert) "
                           "or deepseek"))
    if family == "qwen":
        if len(shared) != 1:
            out.append(Problem("error", "shared_experts", f"Qwen2-MoE needs exactly one shared expert "
                               f"(the recipe has {len(shared)})",
                               "add one shared_experts entry, e.g. the base model with general prompts"))
        elif not shared[0].positive_prompts and recipe.gate_mode not in PROMPTLESS_MODES:
            out.append(Problem("error", "shared_experts[0].positive_prompts",
                               "Qwen2-MoE gates its shared expert (shared_expert_gate) by its prompts",
                               "add prompts of what every token needs, e.g. plain everyday text"))
        elif recipe.gate_mode == "fitted":
            out.append(Problem("warning", "shared_experts[0]", "a fitted router has no row for an always-on "
                               "expert: the shared expert's gate is made as in gate_mode router_input",
                               "fine; the routed experts' router is still fitted"))
    if family == "deepseek":
        if len(shared) > 1:
            out.append(Problem("error", "shared_experts", f"DeepSeek-MoE takes at most one shared expert "
                               f"(the recipe has {len(shared)})", "keep one shared_experts entry"))
        for i, expert in enumerate(shared):
            if expert.positive_prompts or expert.negative_prompts:
                out.append(Problem("error", f"shared_experts[{i}]", "DeepSeek-MoE's shared expert has no "
                                   "gate, so it takes no prompts",
                                   "remove its prompts, or use architecture: qwen for a gated shared expert"))
        if not shared:
            out.append(Problem("warning", "shared_experts", "llama.cpp's DeepSeek graph always adds a shared "
                               "expert, so llama.cpp cannot run this output (transformers' remote code and "
                               "vLLM can)", "add one shared expert, e.g. the base model"))
        remote = ("transformers has no DeepSeek-MoE (v1) class: loading this output needs trust_remote_code "
                  "with deepseek-ai's modeling file, and the workbench's chat cannot load it")
        if allow_remote_code:
            out.append(Problem("warning", "architecture", remote, "fine for llama.cpp's converter and vLLM"))
        else:
            out.append(Problem("error", "architecture", remote, "use architecture: qwen (a gated shared "
                               "expert, native in transformers), or build from the CLI with "
                               "--allow-remote-code"))
    return out

"""Output tables for the families with shared experts: Qwen2-MoE and DeepSeek-MoE (v1).

Names and config keys are mergekit-moe 0.1.5's (`mergekit/moe/qwen.py`, `deepseek.py`),
checked by a test against a listing recorded from it (tests/fixtures). Both keep every
expert under its own classic names (`mlp.experts.e.gate_proj`), which transformers 4 reads
as they are, transformers 5 fuses on load, and vLLM and llama.cpp's converter merge
themselves. Pure functions; no I/O.

- Qwen2-MoE, per layer under `mlp.`: `gate` (E, H), `experts.e.*`, `shared_expert.*` and
  `shared_expert_gate` (1, H): the shared expert's output is scaled by the sigmoid of that
  row times the state. Qwen2-MoE attention has q/k/v biases; a Llama base has none, so they
  are zeros (as mergekit writes them), which every reader loads without a missing key.
  One difference from mergekit: a base with tied embeddings gets its own `lm_head.weight` (a
  copy of the embeddings) and `tie_word_embeddings: false`, because llama.cpp's Qwen2-MoE
  loader requires `output.weight` (src/models/qwen2moe.cpp creates it without the
  not-required flag that its Llama loader uses to fall back to the embeddings), and the
  converter writes none for a tied checkpoint.
- DeepSeek-MoE, per layer under `mlp.`: `gate` (E, H), `experts.e.*` and, with a shared
  expert, `shared_experts.*`, always on and ungated.

Dimensions: L layers, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

from collections.abc import Iterable

from workbench.build.layout import (
    DROPPED_KEYS,
    SAME_NAMES,
    Dims,
    TensorSpec,
    base_plan,
    mlp_specs,
    ties_embeddings,
)
from workbench.recipe import Recipe

# mergekit's DeepSeek config points at deepseek-ai's modeling code on the Hub: transformers
# has no class for model_type "deepseek", so this is what `trust_remote_code=True` loads.
DEEPSEEK_AUTO_MAP = {
    "AutoConfig": "deepseek-ai/deepseek-moe-16b-base--configuration_deepseek.DeepseekConfig",
    "AutoModel": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekForCausalLM",
}


def qwen_plan(base_cfg: dict, expert_count: int, tensor_names_of_base: Iterable[str]) -> list[TensorSpec]:
    def block(layer: int, d: Dims) -> list[TensorSpec]:
        mlp = f"model.layers.{layer}.mlp"
        specs = [TensorSpec(f"{mlp}.gate.weight", "gate", None, layer, (expert_count, d.H), "router"),
                 TensorSpec(f"{mlp}.shared_expert_gate.weight", "gate", None, layer, (1, d.H),
                            "shared_router")]
        for e in range(expert_count):
            specs += mlp_specs(f"{mlp}.experts.{e}", e, layer, d, SAME_NAMES)
        return specs + mlp_specs(f"{mlp}.shared_expert", "shared", layer, d, SAME_NAMES)
    specs = base_plan(base_cfg, tensor_names_of_base, block, "Qwen2-MoE", zero_qkv_bias=True)
    if ties_embeddings(base_cfg):  # untied for llama.cpp (module doc): the head is the embeddings
        d = Dims.of(base_cfg)
        specs.append(TensorSpec("lm_head.weight", "base", "model.embed_tokens.weight", None, (d.V, d.H)))
    return specs


def deepseek_plan(base_cfg: dict, expert_count: int, tensor_names_of_base: Iterable[str],
                  shared: bool) -> list[TensorSpec]:
    def block(layer: int, d: Dims) -> list[TensorSpec]:
        mlp = f"model.layers.{layer}.mlp"
        specs = [TensorSpec(f"{mlp}.gate.weight", "gate", None, layer, (expert_count, d.H), "router")]
        for e in range(expert_count):
            specs += mlp_specs(f"{mlp}.experts.{e}", e, layer, d, SAME_NAMES)
        return specs + (mlp_specs(f"{mlp}.shared_experts", "shared", layer, d, SAME_NAMES) if shared else [])
    return base_plan(base_cfg, tensor_names_of_base, block, "DeepSeek-MoE")


def _common(base_cfg: dict, recipe: Recipe, dtype: str) -> dict:
    """What both families change alike: dropped Llama-only keys, dtype, ties, no sliding window."""
    cfg = {k: v for k, v in base_cfg.items() if k not in DROPPED_KEYS}
    cfg["num_experts_per_tok"] = recipe.experts_per_token
    cfg["norm_topk_prob"] = True  # mergekit: top-k weights renormalised, so copies give the base
    cfg["moe_intermediate_size"] = cfg["intermediate_size"]
    cfg["sliding_window"] = None
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)  # portable_config writes the transformers-4 mirror
    cfg["tie_word_embeddings"] = ties_embeddings(base_cfg)
    # head_dim equals hidden / heads here (validation refuses other bases); older readers lack it.
    cfg.pop("head_dim", None)
    return cfg


def qwen_config(base_cfg: dict, recipe: Recipe, dtype: str) -> dict:
    """The base config as a Qwen2-MoE config. Every changed field is listed here."""
    cfg = _common(base_cfg, recipe, dtype)
    cfg["architectures"] = ["Qwen2MoeForCausalLM"]
    cfg["model_type"] = "qwen2_moe"
    cfg["num_experts"] = len(recipe.experts)
    cfg["decoder_sparse_step"] = 1  # every layer is a MoE layer
    cfg["mlp_only_layers"] = []
    cfg["shared_expert_intermediate_size"] = cfg["intermediate_size"]
    cfg["use_sliding_window"] = False
    cfg["qkv_bias"] = True  # transformers 5's name; 4 always has the biases
    cfg["output_router_logits"] = False
    cfg["router_aux_loss_coef"] = base_cfg.get("router_aux_loss_coef", 0.001)
    cfg["tie_word_embeddings"] = False  # a tied base's head is written out (module doc)
    return cfg


def deepseek_config(base_cfg: dict, recipe: Recipe, dtype: str) -> dict:
    """The base config as a DeepSeek-MoE (v1) config, as mergekit writes it."""
    cfg = _common(base_cfg, recipe, dtype)
    cfg["architectures"] = ["DeepseekForCausalLM"]
    cfg["model_type"] = "deepseek"
    cfg["n_routed_experts"] = len(recipe.experts)
    # None, not 0: the remote code and vLLM build a shared MLP whenever this is not None.
    cfg["n_shared_experts"] = len(recipe.shared_experts) if recipe.shared_experts else None
    cfg["first_k_dense_replace"] = 0
    cfg["moe_layer_freq"] = 1
    cfg["scoring_func"] = "softmax"
    cfg["auto_map"] = dict(DEEPSEEK_AUTO_MAP)
    return cfg

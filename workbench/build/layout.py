"""Output-architecture tables: what every family shares, the Mixtral layout, shards.

Pure functions over config dicts and name lists; no I/O. The names are the classic
per-expert Mixtral layout (`block_sparse_moe.experts.e.w1`), which transformers 4 and 5,
vLLM and llama.cpp's converter all read; tests check the table against a freshly built
tiny transformers MixtralForCausalLM. `base_plan` holds what every family takes from the
base (embeddings, attention, norms, head); the families with shared experts are in
`workbench.build.shared_experts`.

Dimensions: L layers, E experts, H hidden, I intermediate (MLP), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from workbench.errors import BuildError
from workbench.recipe import Recipe

# int: the expert's index in recipe.experts; "shared": recipe.shared_experts[0]; "zeros": written as zeros
Source = Literal["base", "gate", "shared", "zeros"] | int
# w1/w2/w3: an expert's gate/down/up projection (w2 takes residual_scale); shared_router:
# Qwen2-MoE's shared_expert_gate, a (1, H) row made like a router row
Role = Literal["base", "w1", "w2", "w3", "router", "shared_router"]

# Expert MLP (Llama/Mistral name) -> Mixtral expert matrix. w1 and w3 are (I, H), w2 is (H, I).
EXPERT_MATRICES = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TensorSpec:
    out_name: str
    source: Source
    src_name: str | None  # None for the router, which comes from Gates, not a file
    layer: int | None
    shape: tuple[int, ...]
    role: Role = "base"


@dataclass(frozen=True)
class Dims:
    L: int
    H: int
    I: int  # noqa: E741 - the legend's letter for the MLP width
    V: int
    q: int  # attention heads * head_dim
    kv: int  # key/value heads * head_dim

    @classmethod
    def of(cls, cfg: dict) -> Dims:
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            return cls(L=int(cfg["num_hidden_layers"]), H=hidden, I=int(cfg["intermediate_size"]),
                       V=int(cfg["vocab_size"]), q=heads * head_dim, kv=kv_heads * head_dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise BuildError(f"base config.json lacks a usable {exc}; it must describe a Llama or "
                             "Mistral model") from exc


def ties_embeddings(cfg: dict) -> bool:
    # LlamaConfig and MistralConfig both default to untied.
    return bool(cfg.get("tie_word_embeddings", False))


MoeBlock = Callable[[int, Dims], list["TensorSpec"]]  # (layer, dims) -> that layer's MoE tensors


def base_plan(base_cfg: dict, tensor_names_of_base: Iterable[str], moe_block: MoeBlock, family: str,
              *, zero_qkv_bias: bool = False) -> list[TensorSpec]:
    """Every output tensor in file order: embeddings, then layer by layer (norms, attention,
    `moe_block`), then norm and head. `zero_qkv_bias` adds zero q/k/v biases, which Qwen2-MoE's
    attention has and a Llama base lacks (mergekit writes the same zeros)."""
    d = Dims.of(base_cfg)
    names = set(tensor_names_of_base)
    biases = sorted(n for n in names if ".self_attn." in n and n.endswith(".bias"))
    if biases:
        raise BuildError(f"the base has attention biases ({biases[0]}, ...) that a {family} build does not "
                         "copy; use a base without attention_bias")
    specs = [TensorSpec("model.embed_tokens.weight", "base", "model.embed_tokens.weight", None, (d.V, d.H))]
    shapes = {"q_proj": (d.q, d.H), "k_proj": (d.kv, d.H), "v_proj": (d.kv, d.H), "o_proj": (d.H, d.q)}
    for layer in range(d.L):
        p = f"model.layers.{layer}"
        specs.append(_base(f"{p}.input_layernorm.weight", layer, (d.H,)))
        specs += [_base(f"{p}.self_attn.{m}.weight", layer, shapes[m]) for m in ATTENTION]
        if zero_qkv_bias:
            specs += [TensorSpec(f"{p}.self_attn.{m}.bias", "zeros", None, layer, shapes[m][:1])
                      for m in ATTENTION[:3]]
        specs.append(_base(f"{p}.post_attention_layernorm.weight", layer, (d.H,)))
        specs += moe_block(layer, d)
    specs.append(_base("model.norm.weight", None, (d.H,)))
    if not ties_embeddings(base_cfg):
        specs.append(_base("lm_head.weight", None, (d.V, d.H)))
    missing = [s.src_name for s in specs if s.source == "base" and s.src_name not in names]
    if missing:
        raise BuildError(f"the base checkpoint lacks {len(missing)} tensors the MoE needs "
                         f"(first: {missing[0]}); is it a Llama/Mistral model with this config?")
    return specs


ROLES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
SAME_NAMES = tuple((name, name) for name in ROLES)  # the Llama MLP names kept as they are


def mlp_specs(prefix: str, source: Source, layer: int, d: Dims,
              names: Sequence[tuple[str, str]]) -> list[TensorSpec]:
    """One dense MLP's three matrices under `prefix`, from the source's layer `layer`;
    `names` pairs each Llama name (gate_proj, down_proj, up_proj) with its output name."""
    out = []
    for src, dst in names:
        role = ROLES[src]
        shape = (d.H, d.I) if role == "w2" else (d.I, d.H)
        out.append(TensorSpec(f"{prefix}.{dst}.weight", source, f"model.layers.{layer}.mlp.{src}.weight",
                              layer, shape, role))
    return out


def mixtral_plan(base_cfg: dict, expert_count: int, tensor_names_of_base: Iterable[str]) -> list[TensorSpec]:
    """The Mixtral layout: per layer a router and E experts under `block_sparse_moe`."""
    def block(layer: int, d: Dims) -> list[TensorSpec]:
        moe = f"model.layers.{layer}.block_sparse_moe"
        specs = [TensorSpec(f"{moe}.gate.weight", "gate", None, layer, (expert_count, d.H), "router")]
        for e in range(expert_count):
            specs += mlp_specs(f"{moe}.experts.{e}", e, layer, d, EXPERT_MATRICES)
        return specs
    return base_plan(base_cfg, tensor_names_of_base, block, "Mixtral")


def _base(name: str, layer: int | None, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, "base", name, layer, shape)


def plan_shards(sizes: Sequence[tuple[str, int]], shard_size: int) -> list[list[str]]:
    """Greedy by bytes in order: a tensor never splits; a new shard starts when it would overflow."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# Keys of Llama/Mistral configs that MixtralConfig lacks: left in, transformers 4 would keep
# them as stray attributes and readers of Mixtral configs would be misled.
DROPPED_KEYS = ("mlp_bias", "pretraining_tp", "attention_bias", "auto_map", "transformers_version",
                "_name_or_path", "quantization_config")


def mixtral_config(base_cfg: dict, recipe: Recipe, dtype: str) -> dict:
    """The base config turned into a Mixtral config. Every changed field is listed here."""
    cfg = {k: v for k, v in base_cfg.items() if k not in DROPPED_KEYS}
    cfg["architectures"] = ["MixtralForCausalLM"]
    cfg["model_type"] = "mixtral"
    cfg["num_local_experts"] = len(recipe.experts)
    cfg["num_experts_per_tok"] = recipe.experts_per_token
    # Mistral bases carry a window the dense model may never have used; Mixtral attends fully.
    cfg["sliding_window"] = None
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)  # portable_config writes the transformers-4 mirror
    cfg["tie_word_embeddings"] = ties_embeddings(base_cfg)
    # A routing-only MoE: no aux loss, no jitter, and logits not returned by default.
    cfg["output_router_logits"] = False
    cfg["router_aux_loss_coef"] = base_cfg.get("router_aux_loss_coef", 0.001)
    cfg["router_jitter_noise"] = 0.0
    # head_dim is redundant when it equals H / heads; older Mixtral configs do not know it.
    heads = cfg.get("num_attention_heads") or 1
    if cfg.get("head_dim") in (None, (cfg.get("hidden_size") or 0) // heads):
        cfg.pop("head_dim", None)
    return cfg

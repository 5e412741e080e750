"""Mixtral layout tables: names and shapes against a real transformers Mixtral; shards; config."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import MixtralConfig, MixtralForCausalLM

from workbench.build.layout import mixtral_config, mixtral_plan, plan_shards, shard_names
from workbench.errors import BuildError
from workbench.models import WeightIndex
from workbench.recipe import Expert, Recipe

LLAMA_CFG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
    "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 50, "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "mlp_bias": False,
    "attention_bias": False, "pretraining_tp": 1, "head_dim": 4, "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "transformers_version": "5.23.0",
}


def dense_names(cfg: dict) -> list[str]:
    """The tensor names of a Llama checkpoint with this config."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.get("tie_word_embeddings"):
        names.append("lm_head.weight")
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    return names


def recipe(experts: int, k: int = 2) -> Recipe:
    return Recipe(base_model="org/base", experts_per_token=k,
                  experts=[Expert(source_model=f"org/e{i}", positive_prompts=[f"p{i}"])
                           for i in range(experts)])


@pytest.mark.parametrize("tie", [False, True])
def test_plan_matches_a_transformers_mixtral_checkpoint(tmp_path: Path, tie: bool) -> None:
    cfg = {**LLAMA_CFG, "tie_word_embeddings": tie}
    experts = 3
    mixtral = MixtralForCausalLM(MixtralConfig(**mixtral_config(cfg, recipe(experts), "float32")))
    mixtral.save_pretrained(tmp_path)
    saved = {name: WeightIndex(tmp_path).info(name).shape for name in WeightIndex(tmp_path).names}
    plan = mixtral_plan(cfg, experts, dense_names(cfg))
    assert {s.out_name: s.shape for s in plan} == saved
    assert len(plan) == len(saved)  # no name twice
    assert ("lm_head.weight" in saved) is not tie


def test_plan_sources_each_tensor_from_the_right_model() -> None:
    plan = {s.out_name: s for s in mixtral_plan(LLAMA_CFG, 2, dense_names(LLAMA_CFG))}
    w2 = plan["model.layers.1.block_sparse_moe.experts.1.w2.weight"]
    assert (w2.source, w2.src_name, w2.layer, w2.role, w2.shape) == (
        1, "model.layers.1.mlp.down_proj.weight", 1, "w2", (16, 24))
    w1 = plan["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert (w1.src_name, w1.shape) == ("model.layers.0.mlp.gate_proj.weight", (24, 16))
    w3 = plan["model.layers.0.block_sparse_moe.experts.0.w3.weight"]
    assert w3.src_name == "model.layers.0.mlp.up_proj.weight"
    gate = plan["model.layers.1.block_sparse_moe.gate.weight"]
    assert (gate.source, gate.src_name, gate.layer, gate.shape) == ("gate", None, 1, (2, 16))
    assert plan["model.layers.0.self_attn.k_proj.weight"].source == "base"
    assert not any(".mlp." in name for name in plan)


def test_plan_refuses_missing_tensors_and_attention_biases() -> None:
    names = dense_names(LLAMA_CFG)
    with pytest.raises(BuildError, match="lm_head.weight"):
        mixtral_plan(LLAMA_CFG, 2, [n for n in names if n != "lm_head.weight"])
    with pytest.raises(BuildError, match="attention biases"):
        mixtral_plan(LLAMA_CFG, 2, names + ["model.layers.0.self_attn.q_proj.bias"])
    with pytest.raises(BuildError, match="hidden_size"):
        mixtral_plan({k: v for k, v in LLAMA_CFG.items() if k != "hidden_size"}, 2, names)


def test_tied_base_keeps_stored_lm_head_out() -> None:
    cfg = {**LLAMA_CFG, "tie_word_embeddings": True}
    plan = mixtral_plan(cfg, 2, dense_names({**cfg, "tie_word_embeddings": False}))
    assert "lm_head.weight" not in {s.out_name for s in plan}


def test_shards_are_greedy_by_bytes_and_never_split_a_tensor() -> None:
    sizes = [("a", 4), ("b", 4), ("c", 4), ("big", 50), ("d", 1)]
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["big"], ["d"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "big", "d"]]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["big"], ["d"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_mixtral_config_lists_every_change() -> None:
    cfg = mixtral_config({**LLAMA_CFG, "auto_map": {"x": "y"}}, recipe(4, k=2), "float16")
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    assert cfg["sliding_window"] is None
    assert cfg["dtype"] == "float16" and "torch_dtype" not in cfg
    dropped = ("mlp_bias", "attention_bias", "pretraining_tp", "auto_map", "transformers_version", "head_dim")
    for gone in dropped:
        assert gone not in cfg, gone
    assert cfg["rope_parameters"] == LLAMA_CFG["rope_parameters"]
    assert cfg["hidden_size"] == 16 and cfg["vocab_size"] == 50
    assert LLAMA_CFG["model_type"] == "llama"  # the input is not modified
    loaded = MixtralConfig(**cfg)
    assert loaded.num_local_experts == 4 and loaded.num_experts_per_tok == 2


def test_unusual_head_dim_is_kept() -> None:
    cfg = mixtral_config({**LLAMA_CFG, "head_dim": 8}, recipe(2), "float32")
    assert cfg["head_dim"] == 8
    specs = mixtral_plan({**LLAMA_CFG, "head_dim": 8}, 2, dense_names(LLAMA_CFG))
    plan = {s.out_name: s.shape for s in specs}
    assert plan["model.layers.0.self_attn.q_proj.weight"] == (32, 16)
    assert plan["model.layers.0.self_attn.k_proj.weight"] == (16, 16)
    assert plan["model.layers.0.self_attn.o_proj.weight"] == (16, 32)

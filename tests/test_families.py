"""Qwen2-MoE and DeepSeek-MoE outputs: layout against mergekit-moe 0.1.5's recorded listing,
config keys, portable loading, identity with a shared expert, and each expert in its place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.test_build import IDS, PROMPTS, constant_expert, logits, tensors_of
from workbench.build import build
from workbench.build.families import output_config, output_plan
from workbench.errors import BuildError
from workbench.recipe import Expert, Recipe

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "mergekit_moe_layouts.json").read_text())


def dense_names(cfg: dict) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg["tie_word_embeddings"] else
                                                                  ["lm_head.weight"])
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    return names


def fixture_case(name: str) -> tuple[Recipe, dict, dict]:
    """The recorded case as (recipe, the pico base's config, mergekit's output config)."""
    case = FIXTURE["cases"][name]
    recipe = Recipe.model_validate({"base_model": "pico", **case["recipe"]})
    written = case["config"]
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "head_dim": 16,
            "tie_word_embeddings": case["tied"], "rms_norm_eps": 1e-6, "dtype": "float32",
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            **{k: written[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    return recipe, base, written


# Where the workbench writes more than mergekit, on purpose: llama.cpp's Qwen2-MoE loader needs
# output.weight, so a tied base's head is written out (workbench.build.shared_experts).
UNTIED = {"qwen_tied": {"lm_head.weight": [320, 64]}}


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_plan_names_and_shapes_equal_mergekits(name: str) -> None:
    recipe, base, _ = fixture_case(name)
    plan = output_plan(recipe, base, dense_names(base))
    mergekits = FIXTURE["cases"][name]["tensors"]
    assert {s.out_name: list(s.shape) for s in plan} == {**mergekits, **UNTIED.get(name, {})}
    assert len({s.out_name for s in plan}) == len(plan)


FAMILY_KEYS = {
    "qwen": ("architectures", "model_type", "num_experts", "num_experts_per_tok", "decoder_sparse_step",
             "norm_topk_prob", "shared_expert_intermediate_size", "moe_intermediate_size",
             "use_sliding_window", "sliding_window", "qkv_bias", "mlp_only_layers", "tie_word_embeddings"),
    "deepseek": ("architectures", "model_type", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                 "first_k_dense_replace", "moe_layer_freq", "scoring_func", "norm_topk_prob",
                 "moe_intermediate_size", "auto_map", "tie_word_embeddings"),
}


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_config_writes_mergekits_family_keys(name: str) -> None:
    recipe, base, written = fixture_case(name)
    config = output_config(recipe, base, "float32")
    keys = FAMILY_KEYS[recipe.family]
    untied = {"tie_word_embeddings": False} if name in UNTIED else {}
    assert {k: config.get(k) for k in keys} == {k: written.get(k) for k in keys} | untied
    assert base["model_type"] == "llama" and "head_dim" not in config  # input kept; redundant key dropped


def qwen_recipe(base: Path, experts: list[Path], shared: Path, **kwargs) -> Recipe:
    return Recipe(base_model=str(base), architecture="qwen", experts_per_token=2, experts=[
        Expert(source_model=str(e), positive_prompts=PROMPTS[i % 4]) for i, e in enumerate(experts)],
        shared_experts=[Expert(source_model=str(shared), positive_prompts=["Hello! How are you?"])], **kwargs)


def gated_base_logits(base: Path, shared_gates: torch.Tensor) -> torch.Tensor:
    """The base with each MLP's output scaled by 1 + sigmoid(x . g_l): what a Qwen2-MoE computes
    when every routed expert and the shared expert are the base's MLP (top-k weights sum to 1)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for layer, block in enumerate(model.model.layers):
        mlp, row = block.mlp, shared_gates[layer].float()  # (H,)

        def forward(x: torch.Tensor, mlp=mlp, dense=mlp.forward, row=row) -> torch.Tensor:
            return dense(x) * (1 + torch.sigmoid(x @ row)[..., None])
        mlp.forward = forward
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", [{}, {"tie": True}], ids=["untied", "tied"])
def test_qwen_of_base_copies_is_the_base_with_its_shared_gate(pico_factory, tmp_path: Path,
                                                              kind: dict) -> None:
    base = pico_factory("qwen-identity", seed=5, **kind)
    result = build(qwen_recipe(base, [base] * 4, base), tmp_path / "moe", device="cpu")
    model, info = AutoModelForCausalLM.from_pretrained(result.path, output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    weights = tensors_of(result.path)
    shared = torch.stack([weights[f"model.layers.{i}.mlp.shared_expert_gate.weight"][0] for i in range(3)])
    assert shared.abs().sum() > 0  # made from the shared expert's prompts, not left empty
    assert (logits(result.path) - gated_base_logits(base, shared)).abs().max() < 1e-4
    config = json.loads((result.path / "config.json").read_text())
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"  # what transformers 4 reads
    head_is_embeddings = torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert head_is_embeddings is kind.get("tie", False)
    assert config["tie_word_embeddings"] is False  # llama.cpp's Qwen2-MoE loader needs output.weight


def test_each_qwen_expert_and_the_shared_one_land_under_their_names(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("qwen-layout", seed=6)
    experts = [constant_expert(base, tmp_path / f"e{e}", e + 1.0) for e in range(2)]
    shared = constant_expert(base, tmp_path / "shared", 9.0)
    gates = torch.randn(3, 2, 64)
    from workbench.gates import Gates, diagnose

    given = Gates(gates, "random", diagnose(gates), shared=torch.randn(3, 64))
    result = build(qwen_recipe(base, experts, shared), tmp_path / "out", device="cpu", gates=given)
    out = tensors_of(result.path)
    dense = load_file(str(base / "model.safetensors"))
    for layer in range(3):
        mlp = f"model.layers.{layer}.mlp"
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert bool((out[f"{mlp}.experts.1.{name}.weight"] == 2.0).all())
            assert bool((out[f"{mlp}.shared_expert.{name}.weight"] == 9.0).all())
        assert torch.equal(out[f"{mlp}.gate.weight"], gates[layer])
        assert torch.equal(out[f"{mlp}.shared_expert_gate.weight"], given.shared[layer][None])
        attn = f"model.layers.{layer}.self_attn"
        assert torch.equal(out[f"{attn}.q_proj.weight"], dense[f"{attn}.q_proj.weight"])
        assert not out[f"{attn}.k_proj.bias"].any()  # zeros, as mergekit writes them
    without = Gates(gates, "random", diagnose(gates))
    with pytest.raises(BuildError, match="shared_expert_gate"):
        build(qwen_recipe(base, experts, shared), tmp_path / "again", device="cpu", gates=without)
    assert not (tmp_path / "again").exists()


def test_qwen_random_gates_draw_the_shared_row_from_their_own_stream(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("qwen-random", seed=7)
    recipe = qwen_recipe(base, [base, base], base, gate_mode="random")
    out = tensors_of(build(recipe, tmp_path / "out", device="cpu", seed=3).path)
    row = out["model.layers.0.mlp.shared_expert_gate.weight"]
    assert row.shape == (1, 64) and not torch.equal(row[0], out["model.layers.0.mlp.gate.weight"][0])


def test_deepseek_is_refused_before_writing_unless_remote_code_is_allowed(pico_factory,
                                                                          tmp_path: Path) -> None:
    base = pico_factory("deepseek", seed=8)
    experts = [constant_expert(base, tmp_path / f"e{e}", e + 1.0) for e in range(2)]
    recipe = Recipe(base_model=str(base), architecture="deepseek", experts=[
        Expert(source_model=str(e), positive_prompts=PROMPTS[i]) for i, e in enumerate(experts)],
        shared_experts=[Expert(source_model=str(base))])
    with pytest.raises(BuildError, match="trust_remote_code"):
        build(recipe, tmp_path / "refused", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0", "e1"]
    result = build(recipe, tmp_path / "out", device="cpu", allow_remote_code=True)
    config = json.loads((result.path / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["n_shared_experts"] == 1
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("modeling_deepseek.DeepseekForCausalLM")
    out, dense = tensors_of(result.path), load_file(str(base / "model.safetensors"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert bool((out[f"model.layers.2.mlp.experts.0.{name}.weight"] == 1.0).all())
        assert torch.equal(out[f"model.layers.2.mlp.shared_experts.{name}.weight"],
                           dense[f"model.layers.2.mlp.{name}.weight"])
    assert out["model.layers.0.mlp.gate.weight"].shape == (2, 64)
    assert not any("bias" in name for name in out)

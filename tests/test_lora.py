"""`model+lora` expert references: a peft LoRA adapter applied as the expert's weights are read.

Adapters are written here in peft's own format (the keys, shapes and config that peft 0.21's
save_pretrained writes; checked once against a real peft adapter, whose merge_and_unload the
build matched bit for bit), so no test needs peft. An expert's MLP must equal
W + (lora_alpha / r) · B @ A, computed by hand."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.build import build
from workbench.errors import SourceError, WorkbenchError
from workbench.gates import Gates, diagnose
from workbench.models import parse_ref, read_configs, resolve
from workbench.models.lora import open_adapter
from workbench.recipe import parse_recipe, validate

MLP = ("gate_proj", "up_proj", "down_proj")
MATRIX = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
PEFT_CONFIG = {  # what peft 0.21.2 writes for LoraConfig(r=4, lora_alpha=8, target_modules=...)
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "base", "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8,
    "lora_bias": False, "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "peft_type": "LORA", "peft_version": "0.21.2", "r": 4, "rank_pattern": {},
    "revision": None, "target_modules": ["q_proj", *MLP], "target_parameters": None, "task_type": None,
    "use_dora": False, "use_rslora": False, "eva_config": None, "corda_config": None, "use_qalora": False,
}


def write_adapter(folder: Path, base: Path, *, modules=(*MLP, "q_proj"), rank: int = 4, seed: int = 0,
                  **config) -> Path:
    """A random LoRA on `base` in peft's format: lora_A (r, in), lora_B (out, r) per module."""
    weights = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, weight in weights.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in modules and weight.dim() == 2:
            out_features, in_features = weight.shape
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG | {"r": rank} | config))
    return folder


def recipe_for(base: Path, lora_expert: str, **top):
    text = (f"base_model: {base}\ngate_mode: random\n"
            + "".join(f"{k}: {v}\n" for k, v in top.items())
            + f"experts:\n  - source_model: {base}\n  - source_model: {lora_expert}\n")
    recipe, problems = parse_recipe(text)
    assert not [p for p in problems if p.level == "error"], problems
    return recipe


def gates(layers: int = 3, experts: int = 2, hidden: int = 64) -> Gates:
    vectors = torch.randn(layers, experts, hidden, generator=torch.Generator().manual_seed(0))
    return Gates(vectors, "random", diagnose(vectors))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base(pico_factory) -> Path:
    return pico_factory("lora-base", seed=3)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("lora") / "adapter", base)


# ---------------------------------------------------------------- parse and validate

def test_a_lora_reference_parses_into_its_model_and_adapter(base, adapter) -> None:
    parsed = parse_ref(f"{base}+{adapter}")
    assert (parsed.kind, parsed.name) == ("local", str(base)) and parsed.adapter.name == str(adapter)
    hub = parse_ref("org/model@v1+org/model-lora@abc")
    assert (hub.name, hub.revision, hub.adapter.name, hub.adapter.revision) == (
        "org/model", "v1", "org/model-lora", "abc")
    with pytest.raises(SourceError, match="not a LoRA adapter"):
        parse_ref("org/model+demo:smollm2-135m-instruct")
    with pytest.raises(SourceError, match="local model folders are not allowed"):
        parse_ref(f"org/model+{adapter}", allow_local=False)  # a public Space reads no folders


def test_a_good_adapter_validates_with_its_model_config(base, adapter) -> None:
    recipe = recipe_for(base, f"{base}+{adapter}")
    configs = read_configs(recipe.model_refs())
    assert configs[f"{base}+{adapter}"] == configs[str(base)]  # the adapter does not change the shapes
    assert [p for p in validate(recipe, configs) if p.level == "error"] == []


@pytest.mark.parametrize(("config", "says"), [
    ({"use_dora": True}, "use_dora: True (DoRA rescales"),
    ({"rank_pattern": {"gate_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"up_proj": 32}}, "alpha_pattern"),
    ({"fan_in_fan_out": True}, "Conv1D"),
    ({"bias": "lora_only"}, "trains biases"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["down_proj"]}, "replaces whole MLP modules"),
    ({"peft_type": "IA3"}, "is a 'IA3' adapter"),
    ({"kasa_config": {"k": 1}}, "sets kasa_config, which the workbench does not know how to merge"),
])
def test_adapter_kinds_it_cannot_apply_are_refused_at_validation_with_the_way_round(
        base, tmp_path: Path, config: dict, says: str) -> None:
    folder = write_adapter(tmp_path / "odd", base, **config)
    recipe = recipe_for(base, f"{base}+{folder}")
    (problem,) = [p for p in validate(recipe, read_configs(recipe.model_refs())) if p.level == "error"]
    assert problem.path == "experts[1].source_model" and says in problem.message
    assert "merge_and_unload" in problem.fix and "merge_and_unload" not in problem.message


def test_a_pickled_adapter_is_refused_and_never_opened(base, adapter, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for attempt in (lambda: open_adapter("p", folder), lambda: read_configs([f"{base}+{folder}"])):
        try:
            result = attempt()
        except SourceError as exc:
            result = str(exc)
        assert "pickle runs arbitrary code" in str(result)


def test_a_broken_adapter_file_is_named(base, tmp_path: Path) -> None:
    only_a = write_adapter(tmp_path / "half", base, modules=("gate_proj",))
    weights = load_file(str(only_a / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "lora_A" in k}, str(only_a / "adapter_model.safetensors"))
    with pytest.raises(SourceError, match="not both lora_A and lora_B"):
        open_adapter("half", only_a)
    attention_only = write_adapter(tmp_path / "attn", base, modules=("q_proj", "v_proj"))
    with pytest.raises(SourceError, match="adapts no MLP"):
        open_adapter("attn", attention_only)
    magnitude = write_adapter(tmp_path / "dora-keys", base, modules=("up_proj",))
    weights = load_file(str(magnitude / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.ones(96)
    save_file(weights, str(magnitude / "adapter_model.safetensors"))
    with pytest.raises(SourceError, match="changes an MLP in a way the workbench does not apply"):
        open_adapter("dora-keys", magnitude)
    wrong_rank = write_adapter(tmp_path / "rank", base, modules=("up_proj",), rank=4, r=2)
    with pytest.raises(SourceError, match="with r = 2 they must be"):
        open_adapter("rank", wrong_rank)


# ---------------------------------------------------------------- the build

def test_the_expert_is_its_model_plus_the_adapters_delta(base, adapter, tmp_path: Path) -> None:
    result = build(recipe_for(base, f"{base}+{adapter}"), tmp_path / "moe", device="cpu", gates=gates())
    out, dense = tensors(result.path), load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / 4  # lora_alpha / r
    for layer in range(3):
        for module in MLP:
            name = f"model.layers.{layer}.mlp.{module}.weight"
            a = lora[f"base_model.model.model.layers.{layer}.mlp.{module}.lora_A.weight"]  # (r, in)
            b = lora[f"base_model.model.model.layers.{layer}.mlp.{module}.lora_B.weight"]  # (out, r)
            moe = f"model.layers.{layer}.block_sparse_moe.experts"
            assert torch.allclose(out[f"{moe}.1.{MATRIX[module]}.weight"], dense[name] + scale * b @ a,
                                  atol=1e-6)
            assert torch.equal(out[f"{moe}.0.{MATRIX[module]}.weight"], dense[name])  # no adapter there
        # The adapter's q_proj is not the MoE's: attention comes from the base, unchanged.
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert torch.equal(out[q], dense[q])


def test_rslora_scales_by_the_root_of_the_rank(base, tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "rs", base, modules=("up_proj",), use_rslora=True, lora_alpha=6)
    assert open_adapter("rs", folder).scale == pytest.approx(6 / math.sqrt(4))


def test_residual_scale_applies_to_the_adapted_weight(base, adapter, tmp_path: Path) -> None:
    recipe = recipe_for(base, f"{base}+{adapter}")
    recipe.experts[1].residual_scale = 0.5
    out = tensors(build(recipe, tmp_path / "moe", device="cpu", gates=gates()).path)
    dense = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.2.mlp.down_proj"
    expected = (dense["model.layers.2.mlp.down_proj.weight"]
                + 2.0 * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]) * 0.5
    assert torch.allclose(out["model.layers.2.block_sparse_moe.experts.1.w2.weight"], expected, atol=1e-6)


def test_an_adapter_for_another_model_is_refused_before_anything_is_written(base, pico_factory,
                                                                             tmp_path: Path) -> None:
    other = pico_factory("lora-wide", seed=3, intermediate=128)
    folder = write_adapter(tmp_path / "other", other, modules=("up_proj",))
    with pytest.raises(WorkbenchError, match="trained on another model"):
        build(recipe_for(base, f"{base}+{folder}"), tmp_path / "moe", device="cpu", gates=gates())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_chat_refuses_a_lora_reference_rather_than_load_the_plain_model(base, adapter) -> None:
    from workbench.chat.engine import Registry

    with pytest.raises(SourceError, match="applies a LoRA"):
        Registry().get(f"{base}+{adapter}", device="cpu")
    assert resolve(f"{base}+{adapter}").adapter.rank == 4

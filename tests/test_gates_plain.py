"""The gates process's transformers-free path: the plain Llama forward and tokenizer.json reader
must give exactly what transformers gives, and fall back to it wherever they might not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.gates import compute_gates
from workbench.gates import forward as base_forward
from workbench.gates.llama import gate_config, gate_llama
from workbench.gates.plain_tokenizer import PlainTokenizer, plain_tokenizer
from workbench.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def f(x): return x", "Hello there, how are you?", "<s> inside", "ünïcødé  spaces\n", ""]


def recipe(base: Path, mode: str) -> Recipe:
    return Recipe.model_validate({"base_model": str(base), "gate_mode": mode, "experts": [
        {"source_model": str(base), "positive_prompts": ["def f(x):", "import os and more"],
         "negative_prompts": ["Once"]},
        {"source_model": str(base), "positive_prompts": ["Hello there"]},
    ]})


@pytest.mark.parametrize(("family", "tie", "dtype"), [
    ("llama", False, torch.float32), ("llama", True, torch.bfloat16), ("mistral", False, torch.bfloat16),
])
@pytest.mark.parametrize("mode", ["hidden", "router_input", "hidden_avg", "fitted", "cheap_embed"])
def test_plain_forward_gives_transformers_gates_bit_for_bit(pico_factory, monkeypatch, family, tie, dtype,
                                                             mode):
    # Prompts of different lengths share a left-padded forward, so the padded-mask path runs
    # too; the pico models have grouped kv heads (4 query heads, 2 kv heads).
    base = pico_factory("plain", family=family, tie=tie, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    whole = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    want = compute_gates(recipe(base, mode), base, model=whole, tokenizer=tokenizer).vectors
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    plain = base_forward.load_base(base, "cpu")
    assert type(plain).__module__ == "workbench.gates.llama"
    got = compute_gates(recipe(base, mode), base, model=plain, tokenizer=tokenizer).vectors
    assert torch.equal(got, want)


def test_plain_tokenizer_encodes_as_transformers_does(pico_llama):
    plain = plain_tokenizer(pico_llama)
    assert isinstance(plain, PlainTokenizer)
    auto = AutoTokenizer.from_pretrained(pico_llama)
    assert plain(PROMPTS, add_special_tokens=False)["input_ids"] == auto(PROMPTS, add_special_tokens=False)[
        "input_ids"]
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(plain, name) == getattr(auto, name), name


@pytest.mark.parametrize("change", [
    {"tokenizer_class": "LlamaTokenizer"},  # may rebuild the vocabulary with its own normaliser
    {"add_prefix_space": True},  # a setting this reader does not know
    {"bos_token": "<not-in-vocab>"},
    {"split_special_tokens": True},
])
def test_plain_tokenizer_leaves_anything_else_to_transformers(pico_llama, tmp_path, change):
    folder = tmp_path / "tok"
    shutil.copytree(pico_llama, folder)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert plain_tokenizer(folder) is None


def test_plain_tokenizer_defers_when_the_special_tokens_files_disagree(pico_llama, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(pico_llama, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>"}))
    assert plain_tokenizer(folder) is None


@pytest.mark.parametrize("change", [
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"attention_bias": True},
    {"hidden_act": "gelu"},
    {"sliding_window": 128},
    {"architectures": ["Qwen2ForCausalLM"]},
])
def test_plain_forward_takes_only_plain_llama_configs(pico_llama, change):
    config = json.loads((pico_llama / "config.json").read_text())
    assert gate_config(config) is not None
    assert gate_config({**config, **change}) is None


def test_plain_skeleton_names_are_the_checkpoint_keys(pico_llama):
    from safetensors import safe_open

    with safe_open(str(pico_llama / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    names = {name for name, _ in gate_llama(pico_llama).named_parameters()}
    assert names == keys - {"lm_head.weight"}


def test_a_streamed_plain_base_gives_gates_without_importing_transformers(pico_factory):
    # The point of the plain path: the gates process of a build never imports transformers' model code.
    base = pico_factory("plain")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from workbench.gates import forward, compute_gates\n"
        "from workbench.recipe import Recipe\n"
        "forward.STREAM_ABOVE_BYTES = 0\n"
        f"r = Recipe.model_validate_json({recipe(base, 'hidden').model_dump_json()!r})\n"
        f"g = compute_gates(r, Path({str(base)!r}), device='cpu')\n"
        "print(tuple(g.vectors.shape), [m for m in ('transformers', 'accelerate') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("[]"), done.stdout

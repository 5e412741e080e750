"""Portability fix-ups: what transformers 4 needs from a folder that transformers 5 wrote."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig

from workbench.errors import WorkbenchError
from workbench.models import make_tokenizer_portable, portable_config

# Tokenizer classes transformers 4.x exports that can load a tokenizer.json alone.
V4_FAST_CLASSES = {"PreTrainedTokenizerFast", "LlamaTokenizerFast", "GPT2TokenizerFast"}


def test_config_gets_top_level_rope_theta_and_torch_dtype():
    cfg = {"model_type": "llama", "dtype": "bfloat16",
           "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    out = portable_config(cfg)
    assert out["rope_theta"] == 500000.0
    assert out["torch_dtype"] == "bfloat16"
    assert "rope_scaling" not in out  # default RoPE: transformers 4 needs no scaling block
    assert "rope_theta" not in cfg and "torch_dtype" not in cfg  # the input is not modified


def test_config_loses_a_loaders_private_keys():
    cfg = {"model_type": "llama", "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
           "_name_or_path": "/tmp/x", "vocab_size": 9}
    assert portable_config(cfg) == {"model_type": "llama", "vocab_size": 9}


def test_config_keeps_fields_that_are_already_there():
    cfg = {"rope_theta": 1.0, "torch_dtype": "float16", "dtype": "float32",
           "rope_parameters": {"rope_theta": 2.0, "rope_type": "default"}}
    out = portable_config(cfg)
    assert out["rope_theta"] == 1.0 and out["torch_dtype"] == "float16"


def test_nested_rope_parameters_get_no_guessed_theta():
    cfg = {"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                               "sliding_attention": {"rope_theta": 1e4}}}
    assert "rope_theta" not in portable_config(cfg)


def test_scaled_rope_round_trips_through_transformers_5():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    original = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(rope))
    out = portable_config(original.to_dict())
    # transformers 4 reads these two keys; they must describe the same RoPE.
    assert out["rope_theta"] == 500000.0
    assert out["rope_scaling"]["rope_type"] == "llama3" and out["rope_scaling"]["factor"] == 8.0
    # ...and transformers 5, which prefers rope_scaling when present, must still read the same thing.
    reread = LlamaConfig.from_dict(out)
    assert reread.rope_parameters == original.rope_parameters


@pytest.fixture
def tokenizer_folder(tmp_path: Path, pico_llama: Path) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(pico_llama / name, folder / name)
    return folder


def test_tokenizer_class_becomes_one_transformers_4_knows(tokenizer_folder: Path):
    before = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    assert before["tokenizer_class"] == "TokenizersBackend"  # what transformers 5 writes
    make_tokenizer_portable(tokenizer_folder)
    after = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    assert after["tokenizer_class"] in V4_FAST_CLASSES
    # transformers 4 reads the template from this key, not from chat_template.jinja
    assert after["chat_template"] == (tokenizer_folder / "chat_template.jinja").read_text()


def test_portable_tokenizer_behaves_exactly_as_before(tokenizer_folder: Path, pico_llama: Path):
    original = AutoTokenizer.from_pretrained(pico_llama)
    make_tokenizer_portable(tokenizer_folder)
    portable = AutoTokenizer.from_pretrained(tokenizer_folder)
    text = "Once upon a time a dragon solved 2x + 3 = 7."
    assert portable(text)["input_ids"] == original(text)["input_ids"]
    chat = [{"role": "user", "content": "Hello!"}]
    assert (portable.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_a_class_transformers_4_knows_is_left_alone(tokenizer_folder: Path):
    path = tokenizer_folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(tokenizer_class="GPT2Tokenizer", chat_template="{{ 'kept' }}")
    path.write_text(json.dumps(cfg))
    make_tokenizer_portable(tokenizer_folder)
    after = json.loads(path.read_text())
    assert after["tokenizer_class"] == "GPT2Tokenizer"
    assert after["chat_template"] == "{{ 'kept' }}"  # an explicit template is never replaced


def test_without_tokenizer_json_the_class_is_kept_and_a_warning_logged(tokenizer_folder, caplog):
    (tokenizer_folder / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="workbench.models.portable"):
        make_tokenizer_portable(tokenizer_folder)
    after = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    assert after["tokenizer_class"] == "TokenizersBackend"
    assert "transformers 4" in caplog.text


def test_missing_tokenizer_config_is_a_no_op(tmp_path: Path):
    make_tokenizer_portable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_broken_tokenizer_config_names_the_file(tokenizer_folder: Path):
    (tokenizer_folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(WorkbenchError, match="tokenizer_config.json is not valid JSON"):
        make_tokenizer_portable(tokenizer_folder)

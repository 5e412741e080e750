"""Pico random models for tests: a tiny BPE tokenizer and Llama/Mistral checkpoints.

Built in-process, never downloaded. Sizes are small enough that a whole suite of builds
runs in seconds on two CPU cores, yet every dimension differs (H != I != V) so that a
transposed or misplaced tensor shows up as a shape error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "def add(a, b): return a + b",
    "import numpy as np; x = np.zeros(3)",
    "The integral of x squared is x cubed over three.",
    "Solve 2x + 3 = 7 for x.",
    "Once upon a time a dragon guarded a silver castle.",
    "The knight rode through the enchanted forest at night.",
    "Hello! How are you doing today?",
    "Thanks, that sounds great. See you tomorrow.",
    "Good deeds and kindness help everyone.",
    "Evil schemes and cruelty hurt everyone.",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_pico_model(
    folder: Path,
    *,
    family: str = "llama",
    seed: int = 0,
    hidden: int = 64,
    intermediate: int = 96,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    tokenizer: PreTrainedTokenizerFast | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random causal LM (config, safetensors, tokenizer) to `folder` and return it."""
    tokenizer = tokenizer or make_tokenizer()
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[family]
    config = cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init is near zero; scale up so that layers change the residual stream visibly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())

"""A base's tokenizer straight from tokenizer.json, where transformers would use that file as it is.

`AutoTokenizer` imports torch and transformers' model machinery (4-6 s of CPU here) to read
one JSON file; the gates process needs only the ids of a few prompts. For the generic
classes (`PreTrainedTokenizerFast`, `TokenizersBackend`, e.g. Llama 3's tokenizer)
transformers 5 loads tokenizer.json unchanged and encodes with the `tokenizers` library,
so `plain_tokenizer` does the same for them. A model-specific class (LlamaTokenizer,
Qwen2Tokenizer, GPT2Tokenizer, ...) may rebuild the tokenizer from its vocabulary with its
own normaliser, and any setting this module does not know could change the ids, so those
return None and load through transformers (`workbench.gates.forward.load_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")
# tokenizer_config.json keys that do not change how text becomes ids (or are checked below)
KNOWN_KEYS = {*SPECIAL, "tokenizer_class", "backend", "model_max_length", "clean_up_tokenization_spaces",
              "added_tokens_decoder", "chat_template", "padding_side", "truncation_side", "model_input_names",
              "add_bos_token", "add_eos_token", "split_special_tokens", "is_local", "name_or_path"}


class PlainTokenizer:
    """The part of a transformers tokenizer that `tokenize_prompts` uses."""

    def __init__(self, backend: Any, special: dict[str, str | None]):
        self._backend = backend
        for name in SPECIAL:
            token = special.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", backend.token_to_id(token) if token is not None else None)

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        if add_special_tokens:
            raise ValueError("PlainTokenizer encodes without special tokens only")
        encoded = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return {"input_ids": [e.ids for e in encoded]}


def plain_tokenizer(folder: Path) -> PlainTokenizer | None:
    """The tokenizer of `folder` without transformers, or None where transformers could encode
    differently (then load it with AutoTokenizer)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        extra = json.loads((folder / "special_tokens_map.json").read_text()) \
            if (folder / "special_tokens_map.json").is_file() else {}
    except (OSError, ValueError):
        return None
    if (config.get("tokenizer_class") not in GENERIC_CLASSES or set(config) - KNOWN_KEYS
            or config.get("split_special_tokens") or not (folder / "tokenizer.json").is_file()):
        return None
    special = {}
    for name in SPECIAL:
        given = {_content(source[name]) for source in (config, extra) if source.get(name) is not None}
        if len(given) > 1:
            return None  # the two files disagree: let transformers decide
        special[name] = given.pop() if given else None
    from tokenizers import Tokenizer  # lazy: importing this module stays cheap

    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # a file the library cannot read: transformers reports it better
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    listed = config.get("added_tokens_decoder") or {}
    if any(backend.token_to_id(_content(token)) != int(i) for i, token in listed.items()):
        return None  # tokens transformers would add to the vocabulary
    if any(token is not None and backend.token_to_id(token) is None for token in special.values()):
        return None
    return PlainTokenizer(backend, special)


def _content(token: Any) -> str:
    """A special token as saved: a string, or an AddedToken's dict."""
    return token["content"] if isinstance(token, dict) else str(token)

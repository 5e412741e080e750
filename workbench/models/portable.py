"""Fix-ups that make a checkpoint folder load the same in transformers 4 and 5.

transformers 5 writes a few things that transformers 4 misreads or cannot load:
- config.json keeps RoPE settings only in `rope_parameters`; transformers 4 reads the
  top-level `rope_theta` (and `rope_scaling`) and silently falls back to defaults
  (theta 10000, no scaling), which changes every logit.
- config.json names the dtype `dtype`; transformers 4 reads `torch_dtype`.
- tokenizer_config.json names the class `TokenizersBackend`, unknown to transformers 4,
  and moves the chat template out into chat_template.jinja, which older versions ignore.

Both the demo-model cache (`workbench.models.demo`) and the build call these on their output.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Tokenizer classes that only transformers 5 defines.
V5_ONLY_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PythonBackend", "SentencePieceBackend"})
# Keys transformers 5 records about how a tokenizer was loaded, not what it is.
LOADER_KEYS = ("is_local", "local_files_only")


def portable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a config.json dict that transformers 4 and 5 read alike.

    Fields it may add (never overwrites one that is present):
    - `rope_theta`: from a flat `rope_parameters` dict.
    - `rope_scaling`: `rope_parameters` without `rope_theta`, when its `rope_type` is not
      "default" (llama3, yarn, ...); transformers 5 reads it back to the same parameters.
    - `torch_dtype`: a copy of `dtype`.
    Fields it drops: names starting with '_', a loader's bookkeeping and no model's setting
    (`_name_or_path`; `_model_name_or_path`, where transformers' GGUF reader puts the GGUF's
    `general.name`, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2" for the demo model).
    """
    out = {key: value for key, value in copy.deepcopy(cfg).items() if not key.startswith("_")}
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    elif isinstance(rope, dict) and rope:
        # Per-layer-type RoPE (e.g. sliding vs full attention) has no single theta to copy.
        log.debug("rope_parameters is nested by layer type; no top-level rope_theta added")
    if out.get("dtype") is not None:
        out.setdefault("torch_dtype", out["dtype"])
    return out


def make_tokenizer_portable(folder: Path) -> None:
    """Rewrite `folder/tokenizer_config.json` in place so transformers 4 and 5 both load it.

    Sets `tokenizer_class` to PreTrainedTokenizerFast when the saved class exists only in
    transformers 5 (or is missing) and tokenizer.json is there to back it; copies the chat
    template from chat_template.jinja into the `chat_template` key when the key is absent;
    drops loader-only keys. A folder without tokenizer_config.json is left as it is.
    """
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        log.debug("no tokenizer_config.json in %s; nothing to make portable", folder)
        return
    try:
        tok_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"{config_path} is not valid JSON ({exc}); re-save the tokenizer") from exc

    cls = tok_cfg.get("tokenizer_class")
    if cls is None or cls in V5_ONLY_TOKENIZER_CLASSES:
        if (folder / "tokenizer.json").is_file():
            tok_cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        else:
            log.warning("%s: tokenizer_class %r has no tokenizer.json behind it; transformers 4 "
                        "may not load this tokenizer", config_path, cls)

    template_path = folder / "chat_template.jinja"
    if "chat_template" not in tok_cfg and template_path.is_file():
        tok_cfg["chat_template"] = template_path.read_text(encoding="utf-8")

    for key in LOADER_KEYS:
        tok_cfg.pop(key, None)
    config_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""Router prompts as the base model reads them: each prompt set a left-padded batch of token ids,
mergekit's way (BOS text + the prompt) or, for `prompt_template: chat`, as the chat sends a user's
message. Every set is tokenised before any model runs, so a bad prompt fails in a second."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from workbench.errors import GateError
from workbench.recipe import Recipe

MAX_PROMPT_TOKENS = 512  # per prompt; attention memory grows with T^2 (docs/reliability.md)


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], *, where: str = "prompts", max_tokens: int = MAX_PROMPT_TOKENS,
    chat: bool = False,
) -> dict[str, Tensor]:
    """One prompt set -> a left-padded batch {input_ids, attention_mask}, each (B, T).

    Each prompt is the BOS text + the prompt, no special tokens added, no chat template
    (mergekit's way); with `chat`, the prompt as a user's message rendered by the tokenizer's
    chat template, the tokens a chat sends (`workbench.models.user_turn`). Padded on the left
    with BOS (EOS without BOS) so that the last position is every prompt's own last token.
    `where` is the key path used in errors.
    """
    if not prompts:
        raise GateError(f'{where} is empty: give at least one prompt ([""] stands for just the BOS token)')
    texts = prompt_texts(tokenizer, prompts, chat=chat, where=where)
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for j, row in enumerate(rows):
        if len(row) > max_tokens:
            raise GateError(
                f"{where}[{j}] is {len(row)} tokens long; the cap is {max_tokens} tokens per prompt: "
                "shorten it"
            )
        if not row:
            raise GateError(f"{where}[{j}] is empty and the base tokenizer has no BOS token: write some text")
    width = max(len(row) for row in rows)
    candidates = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    pad = next((i for i in candidates if i is not None), None)
    if pad is None and any(len(row) < width for row in rows):
        raise GateError(f"{where}: the base tokenizer has no BOS, EOS or pad token to pad prompts with")
    ids = [[pad] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def prompt_texts(tokenizer: Any, prompts: Sequence[str], *, chat: bool = False,
                 where: str = "prompts") -> list[str]:
    """The text each prompt is tokenised from: BOS text + prompt, or with `chat` its chat rendering."""
    if not chat:
        return [(tokenizer.bos_token or "") + p for p in prompts]
    from workbench.models import TemplateFailure, user_turn

    try:
        return [user_turn(tokenizer, p) for p in prompts]
    except TemplateFailure as exc:
        raise GateError(f"{where}: {exc}; use prompt_template: plain") from exc


def expert_batches(recipe: Recipe, tokenizer: Any) -> list[tuple[dict, dict | None]]:
    """Tokenise every set before any model runs, so a bad prompt fails in a second."""
    batches = []
    for e, expert in enumerate(recipe.experts):
        where = f"experts[{e}]"
        pos = tokenize_prompts(tokenizer, expert.positive_prompts or [], where=f"{where}.positive_prompts",
                               chat=recipe.chats)
        neg = None
        if expert.negative_prompts:
            neg = tokenize_prompts(tokenizer, expert.negative_prompts, where=f"{where}.negative_prompts",
                                   chat=recipe.chats)
        batches.append((pos, neg))
    return batches
